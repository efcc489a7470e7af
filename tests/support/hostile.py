"""Model images that attack the sandbox on purpose, one per behaviour, for the tests of the site worker's containment.

Each is invoked as a model is (`infer`, /assay/data read-only, /assay/out writable). The probes (`network`,
`write_input`, `escape_probe`) print one line per attempt and exit 0 only if every attempt was contained (3 if one
was not); the others just misbehave. `build_hostile_images(client)` builds them once per content, whoever asks first.
"""

from __future__ import annotations

import fcntl
import hashlib
import tempfile
import textwrap
from collections.abc import Iterable
from pathlib import Path

import docker
from docker.errors import ImageNotFound

from assay.demo.build import BASE_IMAGE, ensure_base_image

TAG = "assay-test/hostile-{behaviour}:1"
SOURCE_LABEL = "assay.test.source"

PRELUDE = '''
import os, sys
if sys.argv[1:] != ["infer"]:
    print(f"unknown task {sys.argv[1:]}; this model runs: infer", file=sys.stderr)
    sys.exit(2)
'''

# The probes' bookkeeping: an attempt that raises was contained, one that returns got through (unless it raises
# Contained to say it found nothing to attack).
PROBES = '''
ESCAPED = []

class Contained(Exception):
    pass

def probe(name, attempt):
    try:
        result = attempt()
    except Exception as error:
        print(f"contained {name}: {type(error).__name__}: {error}", flush=True)
    else:
        ESCAPED.append(name)
        print(f"ESCAPED {name}: {result!r}", flush=True)

def finish():
    print(f"{len(ESCAPED)} escaped" + (": " + ", ".join(ESCAPED) if ESCAPED else ""), flush=True)
    sys.exit(3 if ESCAPED else 0)

def write(path, text="written from inside", mode="w"):
    with open(path, mode) as stream:
        stream.write(text)
    return f"wrote {path}"
'''

BENIGN = '''
rows = open("/assay/data/features.csv").read().splitlines()[1:]
with open("/assay/out/predictions.csv", "w") as stream:
    stream.write("case_id,score\\n")
    stream.writelines(f"{row.split(',')[0]},0.5\\n" for row in rows)
print(f"scored {len(rows)} cases")
'''

NETWORK = '''
import socket

def connect(host, port):
    socket.create_connection((host, port), timeout=3).close()
    return "connected"

def send_udp():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.sendto(b"x", ("192.0.2.1", 53))
    return "sent"

def interfaces():
    others = [name for name in os.listdir("/sys/class/net") if name != "lo"]
    if others:
        return others
    raise Contained("only lo")

probe("interfaces other than lo", interfaces)
targets = [("192.0.2.1", 80), ("127.0.0.1", 4222)]
targets += [(t.rpartition(":")[0], int(t.rpartition(":")[2])) for t in os.environ.get("PROBE_TARGETS", "").split(",") if t]
for host, port in targets:
    probe(f"tcp {host}:{port}", lambda: connect(host, port))
probe("udp 192.0.2.1:53", send_udp)
probe("dns example.org", lambda: socket.getaddrinfo("example.org", 443))
finish()
'''

WRITE_INPUT = '''
inputs = sorted(os.listdir("/assay/data"))
first = "/assay/data/" + inputs[0]
probe("create a file in /assay/data", lambda: write("/assay/data/new.csv"))
probe("append to an input file", lambda: write(first, "\\n1,2,3", "a"))
probe("truncate an input file", lambda: os.truncate(first, 0))
probe("remove an input file", lambda: os.remove(first))
probe("rename an input file", lambda: os.rename(first, first + ".moved"))
probe("chmod an input file", lambda: os.chmod(first, 0o777))
probe("make a folder in /assay/data", lambda: os.mkdir("/assay/data/new"))
probe("hard-link an input into /assay/out", lambda: os.link(first, "/assay/out/linked"))
def through_link():
    os.symlink(first, "/assay/out/to-input")
    return write("/assay/out/to-input", "\\n9,9,9", "a")
probe("write an input through a link in /assay/out", through_link)
probe("write into /usr", lambda: write("/usr/lib/planted.py"))
probe("write /etc/passwd", lambda: write("/etc/passwd", "root2::0:0::/:/bin/sh\\n", "a"))
probe("overwrite the model itself", lambda: write("/app/model.py"))
finish()
'''

FORK_BOMB = '''
print("forking", flush=True)
while True:  # every process forks forever: parent and children alike
    try:
        os.fork()
    except OSError:
        pass
'''

MEMORY_HOG = '''
hoard = []
while True:
    hoard.append(b"x" * (16 << 20))  # filled, not just reserved
    print(f"holding {len(hoard) * 16} MiB", flush=True)
'''

IGNORE_SIGTERM_HANG = '''
import signal, time
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
print("ignoring SIGTERM, SIGINT and SIGHUP; hanging", flush=True)
while True:
    time.sleep(1)
'''

LOG_FLOOD = '''
out = sys.stdout.buffer
block = (b"flood " + b"x" * 1017 + b"\\n") * 1024  # 1 MiB of 1 KiB lines
mib = 0
while True:  # until killed, now and then one line of 4 MiB with no newline
    out.write(block if mib % 64 else b"L" * (4 << 20) + b"\\n")
    mib += 1 if mib % 64 else 4
    if mib % 16 == 0:
        with open("/assay/out/flooded", "w") as stream:  # how far it got, for the test to read
            stream.write(str(mib))
'''

ESCAPE_PROBE = '''
import ctypes, socket, stat

libc = ctypes.CDLL(None, use_errno=True)

def call(name, *args):
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return f"{name} succeeded"

def docker_socket():
    for path in ("/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock",
                 "/var/run/docker/containerd/containerd.sock", "/run/podman/podman.sock"):
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(path)
            return f"connected to {path}"
    raise Contained("no engine socket in the container")

def host_processes():
    names = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            names.append(open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")[0].decode(errors="replace"))
        except OSError:
            pass
    host = [n for n in names if any(d in n for d in ("dockerd", "containerd", "systemd", "sshd", "nats-server"))]
    if host:
        return host
    raise Contained(f"{len(names)} processes, all this model's")

def proc_1_root():
    cmdline = open("/proc/1/cmdline", "rb").read().split(b"\\0")
    if b"/app/model.py" in cmdline:
        raise Contained("pid 1 is this model: /proc/1/root is its own root")
    return os.listdir("/proc/1/root")

def mount_tmpfs():
    os.makedirs("/tmp/mnt", exist_ok=True)
    return call("mount", b"none", b"/tmp/mnt", b"tmpfs", 0, None)

def remount_root_rw():
    return call("mount", None, b"/", None, 32, None)  # MS_REMOUNT, without MS_RDONLY

def setns_host():
    fd = os.open("/proc/1/ns/mnt", os.O_RDONLY)
    return call("setns", fd, 0)

def write_first(paths):
    existing = [p for p in paths if os.path.exists(p)]
    if not existing:
        raise Contained("none of " + ", ".join(paths) + " exists")
    for path in existing:
        write(path, "1")
    return f"wrote {existing}"

def capabilities():
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    caps = {k: status[k].strip() for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")}
    if os.getuid() != 0 and all(int(v, 16) == 0 for k, v in caps.items() if k != "CapBnd") and \\
            status["NoNewPrivs"].strip() == "1":
        raise Contained(f"uid {os.getuid()}, {caps}, NoNewPrivs 1")
    return f"uid {os.getuid()} {caps} NoNewPrivs {status['NoNewPrivs'].strip()}"

def mountinfo():
    """Mounts, as (mount point, options, fs type, root within its source)."""
    found = []
    for line in open("/proc/self/mountinfo"):
        fields, _, tail = line.partition(" - ")
        fields, tail = fields.split(), tail.split()
        found.append((fields[4], fields[5].split(","), tail[0], fields[3]))
    return found

def host_backed_writable_mounts():
    host_fs = {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "overlay", "nfs", "nfs4", "fuse", "9p", "virtiofs"}
    writable = [(point, fs) for point, options, fs, _ in mountinfo() if "rw" in options and fs in host_fs]
    others = [w for w in writable if w[0] != "/assay/out"]
    if others:
        return others
    raise Contained(f"only /assay/out is writable on a host file system: {writable}")

def mknod_disk():
    return os.mknod("/tmp/disk", stat.S_IFBLK | 0o600, os.makedev(254, 0)) or "made a block device"

def read_kernel_memory():
    with open("/dev/mem", "rb") as memory:
        return memory.read(16)

probe("docker socket", docker_socket)
probe("host processes in sight", host_processes)
probe("/proc/1/root", proc_1_root)
probe("mount a tmpfs", mount_tmpfs)
probe("remount / writable", remount_root_rw)
probe("unshare a user namespace", lambda: call("unshare", 0x10000000))
probe("unshare a mount namespace", lambda: call("unshare", 0x00020000))
probe("unshare a network namespace", lambda: call("unshare", 0x40000000))
probe("setns into pid 1's mount namespace", setns_host)
probe("write cgroup limits", lambda: write_first([
    "/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/cgroup.procs",
    "/sys/fs/cgroup/pids/pids.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/pids/tasks"]))
probe("write a cgroup release_agent", lambda: write_first([
    "/sys/fs/cgroup/release_agent", "/sys/fs/cgroup/pids/release_agent", "/sys/fs/cgroup/memory/release_agent"]))
probe("make a cgroup", lambda: os.mkdir("/sys/fs/cgroup/escape") or "made /sys/fs/cgroup/escape")
probe("write /proc/sys/kernel/core_pattern", lambda: write("/proc/sys/kernel/core_pattern", "|/tmp/x"))
probe("write /proc/sys/vm/drop_caches", lambda: write("/proc/sys/vm/drop_caches", "3"))
probe("write /proc/sysrq-trigger", lambda: write("/proc/sysrq-trigger", "h"))
probe("write /sys/kernel/uevent_helper", lambda: write("/sys/kernel/uevent_helper", "/tmp/x"))
probe("write /sys/kernel/mm", lambda: write("/sys/kernel/mm/transparent_hugepage/enabled", "never"))
probe("make a block device", mknod_disk)
probe("read /dev/mem", read_kernel_memory)
probe("capabilities and privileges", capabilities)
probe("writable host-backed mounts", host_backed_writable_mounts)
hosts = sorted({root for point, _, fs, root in mountinfo() if root != "/" and point.startswith(("/assay", "/etc"))})
print(f"noted: /proc/self/mountinfo names {len(hosts)} host paths: {hosts}")
finish()
'''

JUNK_FILES = '''
mib, files = int(os.environ.get("JUNK_MIB", "50")), int(os.environ.get("JUNK_FILES", "1000"))
rows = open("/assay/data/features.csv").read().splitlines()[1:]
with open("/assay/out/predictions.csv", "w") as stream:
    stream.write("case_id,score\\n")
    stream.writelines(f"{row.split(',')[0]},0.5\\n" for row in rows)
with open("/assay/out/junk.bin", "wb") as stream:
    for _ in range(mib):
        stream.write(os.urandom(1 << 20))
os.umask(0)
for i in range(files):
    folder = f"/assay/out/junk/{i % 10}"
    os.makedirs(folder, mode=0o777, exist_ok=True)
    with open(f"{folder}/{i}.txt", "w") as stream:
        stream.write("junk")
os.symlink("/etc/passwd", "/assay/out/passwd")
os.mkfifo("/assay/out/pipe")
print(f"wrote {mib} MiB and {files} files of junk next to the predictions")
'''

HUGE_OUTPUT = '''
import time
limit = int(os.environ.get("HUGE_MIB", "512"))  # what it may cost the machine running the tests, if not stopped
spread = int(os.environ.get("HUGE_FILES", "1"))  # into this many files, each under a per-file cap
chunk = b"x" * (1 << 20)
streams = [open(f"/assay/out/huge-{i}.bin", "wb") for i in range(spread)]
for written in range(limit):
    streams[written % spread].write(chunk)
    streams[written % spread].flush()
print(f"wrote {limit} MiB into {spread} files; waiting", flush=True)
time.sleep(3600)
'''

TOO_MANY_FILES = '''
import time
limit = int(os.environ.get("MANY_FILES", "200000"))
os.makedirs("/assay/out/many")
for i in range(limit):
    open(f"/assay/out/many/{i}", "w").close()
print(f"made {limit} files; waiting", flush=True)
time.sleep(3600)
'''

LEAKY_COLUMNS = '''
import csv
with open("/assay/data/features.csv", newline="") as stream:
    rows = list(csv.reader(stream))
header, body = rows[0], rows[1:]
with open("/assay/out/predictions.csv", "w", newline="") as stream:
    writer = csv.writer(stream)
    writer.writerow(["case_id", "score", *header[1:]])  # every input column copied next to the score
    writer.writerows([row[0], "0.5", *row[1:]] for row in body)
print(f"scored {len(body)} cases, with their inputs")
'''

NOT_NUMBERS = '''
ids = [row.split(",")[0] for row in open("/assay/data/features.csv").read().splitlines()[1:]]
odd = ["nan", "inf", "-inf", "1e400", "", "abc", "0x1p-2", "1.5", "-0.5", "NaN"]
with open("/assay/out/predictions.csv", "w") as stream:
    stream.write("case_id,score\\n")
    stream.writelines(f"{case_id},{odd[i % len(odd)]}\\n" for i, case_id in enumerate(ids))
print(f"scored {len(ids)} cases, not with numbers")
'''

MODELS: dict[str, str] = {
    "benign": BENIGN,
    "network": PROBES + NETWORK,
    "write_input": PROBES + WRITE_INPUT,
    "fork_bomb": FORK_BOMB,
    "memory_hog": MEMORY_HOG,
    "ignore_sigterm_hang": IGNORE_SIGTERM_HANG,
    "log_flood": LOG_FLOOD,
    "escape_probe": PROBES + ESCAPE_PROBE,
    "junk_files": JUNK_FILES,
    "huge_output": HUGE_OUTPUT,
    "too_many_files": TOO_MANY_FILES,
    "leaky_columns": LEAKY_COLUMNS,
    "not_numbers": NOT_NUMBERS,
}

DOCKERFILE = f"""FROM {BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY model.py /app/model.py
USER 65534:65534
ENTRYPOINT ["python3", "/app/model.py"]
"""


def model_source(behaviour: str) -> str:
    return textwrap.dedent(PRELUDE) + textwrap.dedent(MODELS[behaviour])


def build_hostile_images(client: docker.DockerClient, behaviours: Iterable[str] = MODELS) -> dict[str, str]:
    """Behaviour -> image id of its model, tagged `assay-test/hostile-<behaviour>:1`. An image whose source is
    unchanged is reused; processes that ask at the same time (pytest-xdist workers) build each once."""
    ensure_base_image(client)
    images = {}
    with open(Path(tempfile.gettempdir(), "assay-hostile-images.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for behaviour in behaviours:
            images[behaviour] = _image(client, behaviour)
    return images


def _image(client: docker.DockerClient, behaviour: str) -> str:
    tag, source = TAG.format(behaviour=behaviour), model_source(behaviour)
    digest = hashlib.sha256((DOCKERFILE + source).encode()).hexdigest()
    try:
        image = client.images.get(tag)
        if image.labels.get(SOURCE_LABEL) == digest:
            return str(image.id)
    except ImageNotFound:
        pass
    with tempfile.TemporaryDirectory(prefix=f"hostile-{behaviour}-") as context:
        Path(context, "model.py").write_text(source)
        Path(context, "Dockerfile").write_text(DOCKERFILE)
        image, _ = client.images.build(path=context, tag=tag, network_mode="none", rm=True, pull=False,
                                       labels={SOURCE_LABEL: digest})
    return str(image.id)
