#!/usr/bin/env bash
# Disk images in the bucket (qcow2, VMDK, VHD, VHDX, VDI, a qcow2 overlay on a backing file)
# appear as raw views "K.raw" beside "K", and VMDK/VHD imports are served raw: each compared
# byte for byte with `qemu-img convert -O raw` of the same file.
source "$(dirname "$0")/lib.sh"

B="$WORK/bucket"
mkdir -p "$B/images" "$WORK/oracle"
make_image "$WORK/base.raw" $((6 * 1048576 + 4096)) 21
truncate -s 12M "$WORK/base.raw"   # a hole at the end
convert() { qemu-img convert -f raw -O "$1" "${@:3}" "$WORK/base.raw" "$B/images/$2"; }
convert qcow2 disk.qcow2
convert qcow2 small-clusters.qcow2 -o cluster_size=4096 -c
convert vmdk sparse.vmdk -o subformat=monolithicSparse
convert vmdk stream.vmdk -o subformat=streamOptimized
convert vpc dynamic.vhd -o subformat=dynamic
convert vpc fixed.vhd -o subformat=fixed,force_size=on
convert vhdx disk.vhdx
convert vdi disk.vdi
qemu-img create -q -f qcow2 -F qcow2 -b disk.qcow2 "$B/images/overlay.qcow2"
qemu-io -c 'write -P 0x5a 1M 64k' "$B/images/overlay.qcow2" >/dev/null
for f in disk.qcow2 small-clusters.qcow2 sparse.vmdk stream.vmdk dynamic.vhd disk.vhdx disk.vdi overlay.qcow2; do
  qemu-img convert -O raw "$B/images/$f" "$WORK/oracle/$f"
done
qemu-img convert -f vpc -O raw "$B/images/fixed.vhd" "$WORK/oracle/fixed.vhd"
# A VMDK import (stream-optimized, as EC2 takes it) in odd-sized parts.
cp "$B/images/stream.vmdk" "$WORK/import.vmdk"
import_manifest "$WORK/import.vmdk" import.vmdk 100001 VMDK "$B" "imports/9f00"
cp "$B/images/dynamic.vhd" "$WORK/import.vhd"
import_manifest "$WORK/import.vhd" import.vhd 1048576 VHD "$B" "imports/9f01"

M="$WORK/mnt"
mount_bucket "$B" "$M" formats
ls -l "$M/images" >/dev/null
for f in disk.qcow2 small-clusters.qcow2 sparse.vmdk stream.vmdk dynamic.vhd fixed.vhd disk.vhdx disk.vdi overlay.qcow2; do
  [ -e "$M/images/$f.raw" ] || fail "no raw view for $f"
  [ "$(stat -c %s "$M/images/$f.raw")" = "$(stat -c %s "$WORK/oracle/$f")" ] || fail "$f.raw size"
  timeout 120 cmp "$M/images/$f.raw" "$WORK/oracle/$f" || fail "$f.raw differs from qemu-img convert"
  cmp -s "$M/images/$f" "$B/images/$f" || fail "$f itself must still show as it is"
done
pass "qcow2 (plain, compressed 4K clusters, overlay), VMDK (sparse, stream), VHD (dynamic, fixed), VHDX and VDI raw views match qemu-img convert"
[ ! -e "$M/images/fixed.vhd.raw.raw" ] || fail "a view of a view"
timeout 60 cmp "$M/imports/9f00/import.vmdk" "$WORK/oracle/stream.vmdk" || fail "VMDK import"
timeout 60 cmp "$M/imports/9f01/import.vhd" "$WORK/oracle/dynamic.vhd" || fail "VHD import"
pass "VMDK and VHD imports are served raw"
unmount "$M"

# A truncated table gives EIO with a log line, never wrong bytes.
mkdir -p "$WORK/bad"
head -c 200000 "$B/images/disk.vdi" >"$WORK/bad/cut.vdi"
M2="$WORK/mnt2"
mount_bucket "$WORK/bad" "$M2" bad
if timeout 30 cat "$M2/cut.vdi.raw" >/dev/null 2>&1; then fail "a truncated VDI was served"; fi
grep -q "cut.vdi" "$WORK/bad.log" || fail "no log line for the truncated VDI"
unmount "$M2"
pass "a truncated image gives EIO and a log line"
echo "all disk format checks passed"
