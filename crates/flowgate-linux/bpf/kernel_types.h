// SPDX-License-Identifier: MIT OR GPL-2.0-only
//
// The few kernel-internal structures owner.bpf.c reads, declared by hand with only the fields it
// uses. Each carries preserve_access_index, so clang records every field access as a CO-RE
// relocation and the loader (aya) rewrites the offsets to those of the running kernel's BTF: the
// order and the missing fields here do not matter, only the names and the field types.
//
// The program-context structures (struct bpf_sock_addr, bpf_sock_ops, bpf_sock) are UAPI and
// come from <linux/bpf.h>.

#ifndef FLOWGATE_KERNEL_TYPES_H
#define FLOWGATE_KERNEL_TYPES_H

#include <linux/types.h>

#define FG_CORE __attribute__((preserve_access_index))

typedef struct {
	__u32 val;
} FG_CORE kuid_t;

struct cred {
	kuid_t uid;
} FG_CORE;

struct mm_struct {
	unsigned long arg_start;
	unsigned long arg_end;
} FG_CORE;

struct task_struct {
	int pid;
	int tgid;
	__u64 start_time;
	char comm[16];
	struct task_struct *real_parent;
	const struct cred *cred;
	struct mm_struct *mm;
} FG_CORE;

struct linux_binprm {
	const char *filename;
	const char *interp;
} FG_CORE;

struct in6_addr {
	union {
		__u8 u6_addr8[16];
		__u32 u6_addr32[4];
	} in6_u;
} FG_CORE;

struct flowi_common {
	int flowic_iif;
	__u8 flowic_proto;
} FG_CORE;

union flowi_uli {
	struct {
		__be16 dport;
		__be16 sport;
	} ports;
} FG_CORE;

struct flowi4 {
	struct flowi_common __fl_common;
	__be32 daddr;
	union flowi_uli uli;
} FG_CORE;

struct flowi6 {
	struct flowi_common __fl_common;
	struct in6_addr daddr;
	union flowi_uli uli;
} FG_CORE;

#endif
