#!/bin/busybox sh
# /init of a kernel-matrix guest (`cargo xtask test-kernels`, xtask/src/kernels/): mount what
# the data-path suite needs, run it, power off. The suite's report goes to the second serial
# port (/dev/ttyS1), which the xtask reads; this console (ttyS0) is kept in
# target/kernels/<label>/console.log.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
echo "init: $(uname -r), $(grep -c ^processor /proc/cpuinfo) cpu, $(grep MemTotal /proc/meminfo)"
INTERCEPTOR_BIN=/usr/bin/interceptor INTERCEPTOR_PROXY_BIN=/usr/bin/interceptor-proxy \
    RUST_BACKTRACE=1 /usr/bin/icpt-kcheck --report /dev/ttyS1
echo "init: icpt-kcheck exited with status $?"
poweroff -f
