// SPDX-License-Identifier: MIT OR GPL-2.0-only
//
// flowgate's kernel-side process attribution: who owns a flow, recorded by the kernel before the
// flow's first packet leaves the socket layer, so that user space, which gets that packet from
// NFQUEUE, can look the owner up at once, even when the process has exited since.
//
// Maps (user space reads them; only these programs write):
//   flows      (proto, local port, remote address, remote port) -> owner of the outbound flow
//   listeners  (proto, local port, local address)               -> owner of the bound socket
//   procs      tgid -> what the process exec'd (path, argv), its parent, uid, start time
//
// Hooks, and why (no fentry/fexit, LSM or kprobes: they may be unavailable, as on kernels that
// block BPF trampolines):
//   sockops TCP_CONNECT_CB         TCP: runs inside connect() on the connecting thread, the local
//                                  port already chosen, before the SYN is built.
//   cgroup/sendmsg4, sendmsg6      unconnected UDP: runs on every sendto/sendmsg with an address,
//                                  the socket already autobound (its port is known).
//   cgroup/connect4, connect6      connected UDP: runs before the autobind, so the local port is
//                                  not known yet; the owner waits in `pending` for ...
//   tp_btf/fib_table_lookup,       ... the route lookup connect() does next, on the same thread,
//   tp_btf/fib6_table_lookup       with the autobound source port in its flowi.
//   cgroup/post_bind4, post_bind6  bind(): listeners and explicitly bound sockets.
//   tp_btf/sched_process_exec,     the process table: exec'd path and argv, inherited by forked
//   tp_btf/sched_process_fork      children until they exec themselves.
//
// The cgroup programs are attached at the cgroup v2 root, so they see every process of the host,
// in every network namespace. The compiled object is committed; build.sh rebuilds it.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "kernel_types.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

#define AF_INET 2
#define AF_INET6 10
#define SOCK_DGRAM 2
#define PROTO_TCP 6
#define PROTO_UDP 17
#define LOOPBACK_IFINDEX 1
#define COMM_LEN 16
#define PATH_LEN 256
#define ARGS_LEN 256

// procs flags
#define PROC_EXEC 1     // filled by an exec this program saw
#define PROC_INTERP 2   // exe is the interpreter of a script (bprm->interp), not the path exec'd
#define PROC_FORKED 4   // copied from the parent at fork (the child has not exec'd since)

struct owner {
	__u32 tgid;
	__u32 tid;
	__u32 uid;
	__u32 gid;
	__u64 cgroup_id;
	__u64 time_ns;
	char comm[COMM_LEN];
};

// An address in 16 bytes, network order; IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d).
struct addr16 {
	__u32 w[4];
};

struct flow_key {
	__u8 protocol;
	__u8 pad[3];
	__u16 local_port;  // host order
	__u16 remote_port; // host order
	struct addr16 remote;
};

struct listener_key {
	__u8 protocol;
	__u8 pad;
	__u16 local_port; // host order
	struct addr16 local; // :: for the unspecified address of IPv6, ::ffff:0.0.0.0 for IPv4's
};

struct pending {
	struct owner owner;
	struct addr16 remote;
	__u16 remote_port; // host order
	__u8 protocol;
	__u8 pad[5];
};

struct proc {
	__u32 ppid;
	__u32 uid;
	__u64 start_ns;
	__u64 cgroup_id;
	char comm[COMM_LEN];
	char exe[PATH_LEN];
	char args[ARGS_LEN];
	__u16 args_len;
	__u8 flags;
	__u8 pad[5];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct owner);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct listener_key);
	__type(value, struct owner);
} listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct proc);
} procs SEC(".maps");

// Connected UDP sockets between connect4/6 and their route lookup, by thread (pid_tgid).
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct pending);
} pending SEC(".maps");

// Room for building a proc (too big for the 512-byte stack).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct proc);
} scratch SEC(".maps");

static __always_inline void current_owner(struct owner *o)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u64 uid_gid = bpf_get_current_uid_gid();

	o->tgid = pid_tgid >> 32;
	o->tid = (__u32)pid_tgid;
	o->uid = (__u32)uid_gid;
	o->gid = uid_gid >> 32;
	o->cgroup_id = bpf_get_current_cgroup_id();
	o->time_ns = bpf_ktime_get_ns();
	bpf_get_current_comm(o->comm, sizeof(o->comm));
}

static __always_inline void map_v4(struct addr16 *a, __u32 ip4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0xffff);
	a->w[3] = ip4;
}

static __always_inline int same_addr(const struct addr16 *a, const struct addr16 *b)
{
	return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] && a->w[3] == b->w[3];
}

static __always_inline void record_flow(struct flow_key *k)
{
	struct owner o = {};

	current_owner(&o);
	bpf_map_update_elem(&flows, k, &o, BPF_ANY);
}

// The remote end of a sock_addr hook's call (the address user space passed). `family` is the
// hook's (a constant: the verifier lets a *4 hook read only user_ip4, a *6 hook only user_ip6).
static __always_inline void sock_addr_remote(struct bpf_sock_addr *ctx, const int family, struct addr16 *a)
{
	if (family == AF_INET) {
		map_v4(a, ctx->user_ip4);
	} else {
		// A dual-stack socket's IPv4 peer is IPv4-mapped here already.
		a->w[0] = ctx->user_ip6[0];
		a->w[1] = ctx->user_ip6[1];
		a->w[2] = ctx->user_ip6[2];
		a->w[3] = ctx->user_ip6[3];
	}
}

SEC("sockops")
int fg_sockops(struct bpf_sock_ops *ctx)
{
	struct flow_key k = {};

	if (ctx->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
		return 1;
	k.protocol = PROTO_TCP;
	k.local_port = (__u16)ctx->local_port;
	k.remote_port = (__u16)bpf_ntohl(ctx->remote_port);
	if (ctx->family == AF_INET) {
		map_v4(&k.remote, ctx->remote_ip4);
	} else if (ctx->family == AF_INET6) {
		// A dual-stack socket's IPv4 peer is already IPv4-mapped here.
		k.remote.w[0] = ctx->remote_ip6[0];
		k.remote.w[1] = ctx->remote_ip6[1];
		k.remote.w[2] = ctx->remote_ip6[2];
		k.remote.w[3] = ctx->remote_ip6[3];
	} else {
		return 1;
	}
	record_flow(&k);
	return 1;
}

static __always_inline int on_sendmsg(struct bpf_sock_addr *ctx, const int family)
{
	struct flow_key k = {};
	struct bpf_sock *sk = ctx->sk;
	struct owner *old;

	if (ctx->protocol != PROTO_UDP || !sk)
		return 1;
	k.protocol = PROTO_UDP;
	k.local_port = (__u16)sk->src_port;
	if (k.local_port == 0)
		return 1;
	k.remote_port = bpf_ntohs((__u16)ctx->user_port);
	sock_addr_remote(ctx, family, &k.remote);
	// Every datagram comes here: skip the write when the same thread owns the entry already.
	old = bpf_map_lookup_elem(&flows, &k);
	if (old && old->tid == (__u32)bpf_get_current_pid_tgid() &&
	    old->tgid == (__u32)(bpf_get_current_pid_tgid() >> 32))
		return 1;
	record_flow(&k);
	return 1;
}

SEC("cgroup/sendmsg4")
int fg_sendmsg4(struct bpf_sock_addr *ctx)
{
	return on_sendmsg(ctx, AF_INET);
}

SEC("cgroup/sendmsg6")
int fg_sendmsg6(struct bpf_sock_addr *ctx)
{
	return on_sendmsg(ctx, AF_INET6);
}

static __always_inline int on_connect(struct bpf_sock_addr *ctx, const int family)
{
	struct pending p = {};
	struct bpf_sock *sk = ctx->sk;
	__u64 pid_tgid;

	// TCP is sockops' (the port is chosen after this hook).
	if (ctx->type != SOCK_DGRAM || ctx->protocol != PROTO_UDP)
		return 1;
	p.protocol = PROTO_UDP;
	p.remote_port = bpf_ntohs((__u16)ctx->user_port);
	sock_addr_remote(ctx, family, &p.remote);
	if (sk && sk->src_port != 0) {
		// Bound before connect(): the local port is known now.
		struct flow_key k = {};

		k.protocol = PROTO_UDP;
		k.local_port = (__u16)sk->src_port;
		k.remote_port = p.remote_port;
		k.remote = p.remote;
		record_flow(&k);
		return 1;
	}
	current_owner(&p.owner);
	pid_tgid = bpf_get_current_pid_tgid();
	bpf_map_update_elem(&pending, &pid_tgid, &p, BPF_ANY);
	return 1;
}

SEC("cgroup/connect4")
int fg_connect4(struct bpf_sock_addr *ctx)
{
	return on_connect(ctx, AF_INET);
}

SEC("cgroup/connect6")
int fg_connect6(struct bpf_sock_addr *ctx)
{
	return on_connect(ctx, AF_INET6);
}

// A route lookup for output (iif is loopback then) of a UDP flow, by a thread with a pending
// connect() to that destination: the flow's local port is the flowi's sport.
static __always_inline void route_looked_up(__u8 proto, const struct addr16 *daddr, __u16 dport, __u16 sport)
{
	__u64 pid_tgid;
	struct pending *p;
	struct flow_key k = {};

	pid_tgid = bpf_get_current_pid_tgid();
	p = bpf_map_lookup_elem(&pending, &pid_tgid);
	if (!p)
		return;
	if (p->protocol != proto || p->remote_port != dport || !same_addr(&p->remote, daddr))
		return;
	k.protocol = proto;
	k.local_port = sport;
	k.remote_port = dport;
	k.remote = *daddr;
	bpf_map_update_elem(&flows, &k, &p->owner, BPF_ANY);
	bpf_map_delete_elem(&pending, &pid_tgid);
}

SEC("tp_btf/fib_table_lookup")
int fg_fib4(__u64 *ctx)
{
	const struct flowi4 *flp = (const struct flowi4 *)ctx[1];
	struct addr16 daddr;
	__u16 sport;

	if (flp->__fl_common.flowic_proto != PROTO_UDP || flp->__fl_common.flowic_iif != LOOPBACK_IFINDEX)
		return 0;
	sport = bpf_ntohs(flp->uli.ports.sport);
	if (sport == 0)
		return 0;
	map_v4(&daddr, flp->daddr);
	route_looked_up(PROTO_UDP, &daddr, bpf_ntohs(flp->uli.ports.dport), sport);
	return 0;
}

SEC("tp_btf/fib6_table_lookup")
int fg_fib6(__u64 *ctx)
{
	const struct flowi6 *flp = (const struct flowi6 *)ctx[3];
	struct addr16 daddr;
	__u16 sport;

	if (flp->__fl_common.flowic_proto != PROTO_UDP || flp->__fl_common.flowic_iif != LOOPBACK_IFINDEX)
		return 0;
	sport = bpf_ntohs(flp->uli.ports.sport);
	if (sport == 0)
		return 0;
	daddr.w[0] = flp->daddr.in6_u.u6_addr32[0];
	daddr.w[1] = flp->daddr.in6_u.u6_addr32[1];
	daddr.w[2] = flp->daddr.in6_u.u6_addr32[2];
	daddr.w[3] = flp->daddr.in6_u.u6_addr32[3];
	route_looked_up(PROTO_UDP, &daddr, bpf_ntohs(flp->uli.ports.dport), sport);
	return 0;
}

static __always_inline int on_post_bind(struct bpf_sock *sk, const int family)
{
	struct listener_key k = {};
	struct owner o = {};

	if (sk->protocol != PROTO_TCP && sk->protocol != PROTO_UDP)
		return 1;
	k.protocol = sk->protocol;
	k.local_port = (__u16)sk->src_port;
	if (k.local_port == 0)
		return 1;
	if (family == AF_INET) {
		map_v4(&k.local, sk->src_ip4);
	} else {
		k.local.w[0] = sk->src_ip6[0];
		k.local.w[1] = sk->src_ip6[1];
		k.local.w[2] = sk->src_ip6[2];
		k.local.w[3] = sk->src_ip6[3];
	}
	current_owner(&o);
	bpf_map_update_elem(&listeners, &k, &o, BPF_ANY);
	return 1;
}

SEC("cgroup/post_bind4")
int fg_post_bind4(struct bpf_sock *sk)
{
	return on_post_bind(sk, AF_INET);
}

SEC("cgroup/post_bind6")
int fg_post_bind6(struct bpf_sock *sk)
{
	return on_post_bind(sk, AF_INET6);
}

SEC("tp_btf/sched_process_exec")
int fg_exec(__u64 *ctx)
{
	struct task_struct *p = (struct task_struct *)ctx[0];
	struct linux_binprm *bprm = (struct linux_binprm *)ctx[2];
	__u32 zero = 0, tgid;
	struct proc *v;
	const char *exe;
	unsigned long start, end, len;

	v = bpf_map_lookup_elem(&scratch, &zero);
	if (!v)
		return 0;
	tgid = p->tgid;
	v->ppid = p->real_parent->tgid;
	v->uid = (__u32)bpf_get_current_uid_gid();
	v->start_ns = p->start_time;
	v->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(v->comm, sizeof(v->comm));
	v->flags = PROC_EXEC;
	exe = bprm->filename;
	if (bprm->interp && bprm->interp != exe) {
		exe = bprm->interp;
		v->flags |= PROC_INTERP;
	}
	if (bpf_probe_read_kernel_str(v->exe, sizeof(v->exe), exe) < 0)
		v->exe[0] = 0;
	// The new image's argv, NUL-separated, as the exec left it on the new stack.
	start = p->mm->arg_start;
	end = p->mm->arg_end;
	len = end > start ? end - start : 0;
	if (len > ARGS_LEN)
		len = ARGS_LEN;
	v->args_len = 0;
	if (len > 0 && bpf_probe_read_user(v->args, len, (const void *)start) == 0)
		v->args_len = len;
	bpf_map_update_elem(&procs, &tgid, v, BPF_ANY);
	return 0;
}

SEC("tp_btf/sched_process_fork")
int fg_fork(__u64 *ctx)
{
	struct task_struct *parent = (struct task_struct *)ctx[0];
	struct task_struct *child = (struct task_struct *)ctx[1];
	__u32 zero = 0, parent_tgid, child_tgid;
	struct proc *from, *v;

	if (child->pid != child->tgid)
		return 0; // a thread
	parent_tgid = parent->tgid;
	child_tgid = child->tgid;
	from = bpf_map_lookup_elem(&procs, &parent_tgid);
	if (!from)
		return 0;
	v = bpf_map_lookup_elem(&scratch, &zero);
	if (!v)
		return 0;
	if (bpf_probe_read_kernel(v, sizeof(*v), from))
		return 0;
	v->ppid = parent_tgid;
	v->start_ns = child->start_time;
	v->flags = (v->flags & PROC_INTERP) | PROC_FORKED;
	bpf_map_update_elem(&procs, &child_tgid, v, BPF_ANY);
	return 0;
}
