package main

// The image's binary carries its capabilities as permitted file
// capabilities only (setcap cap_net_raw,cap_net_admin+p, no effective
// bit): the kernel then runs it whatever subset of the two the container
// allows (Docker's default set has NET_RAW and not NET_ADMIN; M-Lab's
// DaemonSet adds NET_RAW alone), where an effective bit makes exec fail
// with EPERM unless every file capability is in the bounding set. The
// binary raises what it was granted into its effective set itself, here,
// in a C constructor: it runs before the Go runtime starts its threads,
// which inherit the set (capabilities are per thread, and Go cannot change
// every thread's set when cgo is in use). TestImageCapabilities in e2e
// execs the binary as the kernel would under each set, with capsh.

/*
#include <linux/capability.h>
#include <sys/syscall.h>
#include <unistd.h>

__attribute__((constructor)) static void packet_headers_raise_caps(void) {
	struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct d[2];
	if (syscall(SYS_capget, &h, d) != 0) {
		return;
	}
	__u32 want = (1u << CAP_NET_RAW) | (1u << CAP_NET_ADMIN);
	__u32 add = d[0].permitted & want & ~d[0].effective;
	if (add == 0) {
		return;
	}
	d[0].effective |= add;
	syscall(SYS_capset, &h, d);
}
*/
import "C"
