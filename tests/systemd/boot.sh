#!/bin/bash
# PID 1 of fresh pid, mount, uts, ipc, net and cgroup namespaces (see machine.rs):
# build a root of read-only-below overlays of the host's /usr, /etc and /var (the
# test's files are already in the upper layers), a private /run and /tmp, a
# cgroup2 mount of the cgroup the test made for us, then become systemd.
set -eu
T=$1
R=$T/root
exec >"$T/console.log" 2>&1
# Our pid as the host sees it (this /proc is still the host's).
read -r hostpid _ </proc/self/stat
echo "$hostpid" >"$T/hostpid.tmp"
mv "$T/hostpid.tmp" "$T/hostpid"
mkdir -p "$R"
mount -t tmpfs -o mode=755 tmpfs "$R"
mkdir -p "$R"/{usr,etc,var,run,tmp,proc,sys,dev,root,oldroot}
for d in usr etc var; do
  mkdir -p "$T/$d.up" "$T/$d.work"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$T/$d.up,workdir=$T/$d.work" "$R/$d"
done
for l in bin sbin lib lib32 lib64 libx32; do
  if [ -L "/$l" ]; then ln -s "$(readlink "/$l")" "$R/$l"; fi
done
mount --rbind /dev "$R/dev"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=755 tmpfs "$R/run"
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
cd "$R"
pivot_root . oldroot
umount -l /oldroot
rmdir /oldroot
# basic.target: journald, sockets, slices; not the host's multi-user services.
exec env -i container=arbiter-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  /lib/systemd/systemd --unit=basic.target --log-target=journal </dev/null
