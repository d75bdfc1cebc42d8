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
convert qcow2 v2.qcow2 -o compat=0.10
convert qcow2 zstd.qcow2 -o compression_type=zstd -c
convert vmdk flat.vmdk -o subformat=monolithicFlat
convert vmdk split.vmdk -o subformat=twoGbMaxExtentSparse
convert vmdk splitflat.vmdk -o subformat=twoGbMaxExtentFlat
convert vhdx fixed.vhdx -o subformat=fixed
convert vdi static.vdi -o static=on
qemu-img create -q -f qcow2 -F qcow2 -b disk.qcow2 "$B/images/overlay.qcow2"
qemu-io -c 'write -P 0x5a 1M 64k' "$B/images/overlay.qcow2" >/dev/null
VIEWS="disk.qcow2 small-clusters.qcow2 v2.qcow2 zstd.qcow2 overlay.qcow2 sparse.vmdk stream.vmdk
  flat.vmdk split.vmdk splitflat.vmdk dynamic.vhd fixed.vhd disk.vhdx fixed.vhdx disk.vdi static.vdi"
for f in $VIEWS; do
  [ "$f" = fixed.vhd ] || qemu-img convert -O raw "$B/images/$f" "$WORK/oracle/$f"
done
qemu-img convert -f vpc -O raw "$B/images/fixed.vhd" "$WORK/oracle/fixed.vhd"
# A VMDK import (stream-optimized, as EC2 takes it) in odd-sized parts.
cp "$B/images/stream.vmdk" "$WORK/import.vmdk"
import_manifest "$WORK/import.vmdk" import.vmdk 100001 VMDK "$B" "imports/9f00"
cp "$B/images/dynamic.vhd" "$WORK/import.vhd"
import_manifest "$WORK/import.vhd" import.vhd 1048576 VHD "$B" "imports/9f01"

# A qcow2 file that was bundled: the bundle's image K reads as the raw disk.
make_keys cloud
"$IMGFS" bundle "$B/images/disk.qcow2" --cert "$WORK/cloud-cert.pem" --part-size 1M \
  -d "$B/bundled" >/dev/null

M="$WORK/mnt"
mount_bucket "$B" "$M" formats --key "$WORK/cloud-pk.pem"
ls -l "$M/images" >/dev/null
for f in $VIEWS; do
  [ -e "$M/images/$f.raw" ] || fail "no raw view for $f"
  [ "$(stat -c %s "$M/images/$f.raw")" = "$(stat -c %s "$WORK/oracle/$f")" ] || fail "$f.raw size"
  timeout 120 cmp "$M/images/$f.raw" "$WORK/oracle/$f" || fail "$f.raw differs from qemu-img convert"
  cmp -s "$M/images/$f" "$B/images/$f" || fail "$f itself must still show as it is"
done
pass "every subformat's raw view matches qemu-img convert: qcow2 (v3, v2, deflate 4K clusters, zstd, overlay), VMDK (monolithicSparse, streamOptimized, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat), VHD (dynamic, fixed), VHDX (dynamic, fixed), VDI (dynamic, static)"
[ ! -e "$M/images/fixed.vhd.raw.raw" ] || fail "a view of a view"
for extent in split-s001.vmdk flat-flat.vmdk splitflat-f001.vmdk; do
  [ -e "$M/images/$extent" ] || fail "extent file $extent must still show as itself"
  [ ! -e "$M/images/$extent.raw" ] || fail "extent file $extent got a raw view of its own"
done
pass "a multi-file VMDK has one raw view, for its descriptor"

# Random reads at odd offsets and lengths match the oracle.
for f in disk.qcow2 small-clusters.qcow2 stream.vmdk split.vmdk dynamic.vhd disk.vhdx disk.vdi; do
  size=$(stat -c %s "$WORK/oracle/$f")
  for i in 1 2 3 4 5 6; do
    offset=$(( (RANDOM * 32768 + RANDOM) % size ))
    length=$(( RANDOM % 70000 + 1 ))
    cmp <(dd if="$M/images/$f.raw" iflag=skip_bytes,count_bytes skip=$offset count=$length status=none) \
        <(dd if="$WORK/oracle/$f" iflag=skip_bytes,count_bytes skip=$offset count=$length status=none) ||
      fail "$f.raw: $length bytes at $offset"
  done
done
pass "random reads at odd offsets match"

# SEEK_DATA/SEEK_HOLE follow each format's allocation map: the data runs equal qemu-img map's
# (qemu's vhdx driver reports no allocation, so VHDX is checked by the copy alone), and a copy
# made of the data runs alone equals the image.
qemu_data_runs() {
  qemu-img map --output=json "$1" |
    sed -n 's/.*"start": \([0-9]*\), "length": \([0-9]*\),.*"data": \(true\|false\).*/\1 \2 \3/p' |
    awk '$3 == "true" { if (n && s + l == $1) { l += $2 } else { if (n) print s, l; s = $1; l = $2; n = 1 } }
         END { if (n) print s, l }'
}
for f in disk.qcow2 small-clusters.qcow2 v2.qcow2 sparse.vmdk stream.vmdk split.vmdk dynamic.vhd disk.vhdx disk.vdi; do
  "$SEEK_MAP" "$M/images/$f.raw" >"$WORK/seek-$f" || fail "$f.raw: seek_map failed"
  [ "$f" = disk.vhdx ] || diff <(qemu_data_runs "$B/images/$f") "$WORK/seek-$f" >/dev/null ||
    fail "$f.raw: SEEK_DATA/SEEK_HOLE runs differ from qemu-img map: $(diff <(qemu_data_runs "$B/images/$f") "$WORK/seek-$f" | head -5)"
  truncate -s "$(stat -c %s "$WORK/oracle/$f")" "$WORK/sparse-$f"
  while read -r start length; do
    dd if="$M/images/$f.raw" of="$WORK/sparse-$f" iflag=skip_bytes,count_bytes oflag=seek_bytes \
      skip="$start" seek="$start" count="$length" conv=notrunc status=none
  done <"$WORK/seek-$f"
  cmp "$WORK/sparse-$f" "$WORK/oracle/$f" || fail "$f.raw: a hole that SEEK_HOLE reported holds data"
  rm -f "$WORK/sparse-$f"
done
[ "$(head -1 "$WORK/seek-disk.qcow2")" != "0 $(stat -c %s "$WORK/oracle/disk.qcow2")" ] ||
  fail "disk.qcow2.raw reports no holes at all"
cp --sparse=always "$M/images/disk.qcow2.raw" "$WORK/copy.raw"
cmp "$WORK/copy.raw" "$WORK/oracle/disk.qcow2" || fail "cp --sparse=always copy differs"
[ $(($(stat -c %b "$WORK/copy.raw") * 512)) -lt "$(stat -c %s "$WORK/copy.raw")" ] ||
  fail "cp --sparse=always made a copy without holes"
pass "SEEK_DATA/SEEK_HOLE agree with qemu-img map and never hide data; cp --sparse=always works"
[ "$(stat -c %s "$M/bundled/disk.qcow2")" = "$(stat -c %s "$WORK/oracle/disk.qcow2")" ] ||
  fail "bundled qcow2: size is not the virtual disk's"
timeout 60 cmp "$M/bundled/disk.qcow2" "$WORK/oracle/disk.qcow2" || fail "bundled qcow2 is not raw"
grep -q '"bundled_format":"qcow2"' "$M/.imgfs/stats.json" || fail "stats do not name the bundled format"
pass "a bundled qcow2 reads as its raw disk"
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
