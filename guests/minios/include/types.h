/* Basic freestanding types shared by the kernel, the user programs and lib. */
#ifndef MINIOS_TYPES_H
#define MINIOS_TYPES_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char s8;
typedef short s16;
typedef int s32;
typedef long long s64;
typedef unsigned long uptr;
typedef long sptr;
typedef __SIZE_TYPE__ size_t;

#define NULL ((void *)0)
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

#include <stdarg.h>

#endif
