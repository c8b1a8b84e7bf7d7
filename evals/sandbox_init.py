"""Turns a fresh process into the sandbox, then runs one program in it.

    sandbox_init.run(cfg)        # in a child of evals/fork_server.py (how evals/sandbox.py runs it)
    python -I -S evals/sandbox_init.py '<JSON config>'      # the same, by hand

Layers, each applied only when the config names it (evals/sandbox.py probes which ones this kernel
allows and says so):
- "namespaces": new user (only when not root), mount, pid, network, ipc and uts namespaces. This
  process stays outside as the namespace's reaper-watcher; its child is pid 1 inside, and the whole
  namespace dies with pid 1.
- "empty_root": pid 1 builds a tmpfs root holding only the interpreter's prefix (its site-packages
  hidden), the shared libraries, /dev/{null,zero,random,urandom}, the jail programs at /jail and a
  private 64 MiB /tmp (the cwd, with the staged files); pivot_root into it and drops the host's tree.
  No /proc, no repository, no benchmarks, no host sockets, nothing writable of the host.
- "slot_uid": the program runs as the slot's own uid and gid (no supplementary groups).
- "no_new_privs", "seccomp" (EPERM for ptrace, process_vm_*, pidfd_getfd, mount, unshare, setns,
  keyctl, bpf, perf_event_open, ... through libseccomp), rlimits always.
The program is then run by path, in this interpreter (no second start-up), as __main__.
"""

import ctypes
import json
import os
import resource
import runpy
import sys

CLONE = {"NEWNS": 0x20000, "NEWUTS": 0x4000000, "NEWIPC": 0x8000000, "NEWUSER": 0x10000000,
         "NEWPID": 0x20000000, "NEWNET": 0x40000000}  # fmt: skip
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
MNT_DETACH, PR_SET_NO_NEW_PRIVS = 2, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
SECCOMP_DENY = ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "mount", "umount2",
                "pivot_root", "chroot", "unshare", "setns", "keyctl", "add_key", "request_key", "bpf",
                "perf_event_open", "userfaultfd", "kexec_load", "init_module", "finit_module",
                "delete_module", "reboot", "swapon", "swapoff", "open_by_handle_at", "name_to_handle_at",
                "fsopen", "fsmount", "move_mount", "open_tree", "io_uring_setup", "acct", "quotactl",
                "settimeofday", "clock_settime", "sethostname", "setdomainname")  # fmt: skip
SETUP_FAILED = 125  # exit code for "the sandbox could not be built" (the parent reports it as an error)

libc = ctypes.CDLL(None, use_errno=True)


def run(cfg: dict) -> None:
    """Build the sandbox `cfg` describes in this process and run its program; never returns."""
    layers = set(cfg["layers"])
    try:
        if "namespaces" in layers:
            _enter_namespaces()  # from here on: pid 1 of the new namespaces
        if "empty_root" in layers:
            _build_root(cfg)
        else:
            os.chdir(cfg["stage"])
    except OSError as e:
        print(f"sandbox setup failed: {e}", file=sys.stderr)
        os._exit(SETUP_FAILED)
    pid = os.fork()
    if pid == 0:
        _become_program(cfg, layers)
    os._exit(_reap_until(pid))


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _enter_namespaces() -> None:
    uid, gid = os.geteuid(), os.getegid()
    flags = sum(CLONE[n] for n in ("NEWNS", "NEWPID", "NEWNET", "NEWIPC", "NEWUTS"))
    _check(libc.unshare(flags | (CLONE["NEWUSER"] if uid else 0)), "unshare")
    if uid:  # not root: be root of the new user namespace (only our own uid is mapped)
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    pid = os.fork()
    if pid:  # outside: wait for pid 1 and exit as it did
        os._exit(_reap_until(pid))


def _mount(src, dst, fstype, flags, data=None) -> None:
    enc = [None if x is None else x.encode() for x in (src, dst, fstype, data)]
    _check(libc.mount(enc[0], enc[1], enc[2], flags, enc[3]), f"mount {src} on {dst}")


def _bind(src: str, root: str, writable: bool = False) -> None:
    dst = root + src
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    _mount(src, dst, None, MS_BIND | MS_REC)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | (0 if writable else MS_RDONLY)
    _mount(None, dst, None, flags | (0 if src.startswith("/dev/") else MS_NODEV))


def _build_root(cfg: dict) -> None:
    root = cfg["root"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("sandbox", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for path in cfg["ro_binds"]:
        _bind(path, root)
    for path in cfg["hide"]:
        _mount("sandbox", root + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=555")
    for dev in ("null", "zero", "random", "urandom"):
        _bind(f"/dev/{dev}", root, writable=True)
    os.makedirs(root + "/jail")
    _mount(cfg["jail"], root + "/jail", None, MS_BIND | MS_REC)
    _mount(None, root + "/jail", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for link, target in cfg["symlinks"].items():
        os.symlink(target, root + link)
    os.makedirs(root + "/tmp")
    _mount("sandbox", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmp_mb']}m,mode=1777")
    for name in os.listdir(cfg["stage"]):
        with open(os.path.join(cfg["stage"], name), "rb") as src, open(root + "/tmp/" + name, "wb") as dst:
            dst.write(src.read())
        if cfg.get("uid") is not None:
            os.chown(root + "/tmp/" + name, cfg["uid"], cfg["uid"])
    _mount(None, root, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(root)
    _check(libc.syscall(SYS_PIVOT_ROOT[os.uname().machine], b".", b"."), "pivot_root")
    _check(libc.umount2(b".", MNT_DETACH), "detaching the host's tree")
    os.chdir("/tmp")


def _become_program(cfg: dict, layers: set) -> None:
    """The program's process: limits, uid, no_new_privs, seccomp, then the program. Never returns."""
    try:
        for name, value in cfg["rlimits"].items():  # [soft, hard]
            resource.setrlimit(getattr(resource, name), tuple(value))
        if "slot_uid" in layers:
            os.setgroups([])
            os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        if "no_new_privs" in layers:
            _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        if "seccomp" in layers:
            _load_seccomp(cfg["seccomp_lib"])
    except OSError as e:
        print(f"sandbox setup failed: {e}", file=sys.stderr)
        os._exit(SETUP_FAILED)
    sys.argv = [cfg["program"]]
    runpy.run_path(cfg["program"], run_name="__main__")
    sys.stdout.flush()
    os._exit(0)


def _load_seccomp(path: str) -> None:
    lib = ctypes.CDLL(path)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    allow, eperm = 0x7FFF0000, 0x00050000 | 1
    ctx = lib.seccomp_init(allow)
    for name in SECCOMP_DENY:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0 and lib.seccomp_rule_add(ctx, eperm, nr, 0) != 0:
            raise OSError(0, f"seccomp rule for {name}")
    if lib.seccomp_load(ctypes.c_void_p(ctx)) != 0:
        raise OSError(0, "seccomp_load failed")


def _reap_until(pid: int) -> int:
    """Wait for `pid` (reaping any orphan on the way, as pid 1 must); its exit code, or 128 + signal."""
    while True:
        done, status = os.waitpid(-1, 0)
        if done == pid:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
