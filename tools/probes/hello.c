/* A small static program to exec from a stub. */
#include <stdio.h>
int main(void) { puts("hello from a stub"); return 0; }
