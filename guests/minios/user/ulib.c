/* Ring-3 library: formatted output through SYS_WRITE. */
#include "usys.h"

int uprintf(const char *fmt, ...)
{
	char buf[200];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(buf) - 1)
		n = sizeof(buf) - 1;
	u_write(buf, (u32)n);
	return n;
}
