"""The code sandbox's launcher (standard library only): `fabric.reward.sandbox` runs it as root under
`unshare --net --mount --pid --fork`, in the program's fresh work folder, with one JSON argument:
{"python": ..., "uid": ..., "limits": {"RLIMIT_CPU": [soft, hard], ...}}.

In its own mount namespace it covers the folders anyone may write (/tmp, /var/tmp, /dev/shm, /run/lock) with
empty read-only tmpfs, and binds the work folder at /tmp/w. Then it forks the program (`python -I prog.py`) under
the limits as `uid` (no groups, no capabilities) and waits for it. This process is the PID namespace's init: when it
exits, the kernel kills whatever the program left (a fork bomb's children included). Exit status: the program's, or
128 + the signal that killed it; 125 with "sandbox:" on stderr when the sandbox itself could not be set up.
"""

import ctypes
import json
import os
import resource
import sys

MS_NOSUID, MS_NODEV, MS_BIND = 2, 4, 4096
WORK = "/tmp/w"
HIDDEN = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def mount(libc, source, target, fstype, flags, data):
    if libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags, data.encode()) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {target}: {os.strerror(errno)}")


def setup(uid):
    libc = ctypes.CDLL(None, use_errno=True)
    for folder in HIDDEN:
        if os.path.isdir(folder) and not os.path.islink(folder):
            mount(libc, "tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
    os.mkdir(WORK)
    mount(libc, "/proc/self/cwd", WORK, None, MS_BIND, "")  # the cwd still names the work folder under /tmp
    os.chdir(WORK)


def main():
    spec = json.loads(sys.argv[1])
    try:
        setup(spec["uid"])
    except OSError as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        sys.exit(125)
    pid = os.fork()
    if pid == 0:
        try:
            for name, (soft, hard) in spec["limits"].items():
                resource.setrlimit(getattr(resource, name), (soft, hard))
            os.setgroups([])
            os.setgid(spec["uid"])
            os.setuid(spec["uid"])
            env = {"PATH": "/usr/bin:/bin", "HOME": WORK, "TMPDIR": WORK, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
            os.execve(spec["python"], [spec["python"], "-I", "prog.py"], env)
        except BaseException as exc:  # noqa: BLE001 - the child must never return into the launcher
            print(f"sandbox: {exc}", file=sys.stderr)
        os._exit(125)
    while True:  # init reaps every orphan until the program itself ends
        done, status = os.wait()
        if done == pid:
            code = os.waitstatus_to_exitcode(status)
            sys.exit(128 - code if code < 0 else code)


if __name__ == "__main__":
    main()
