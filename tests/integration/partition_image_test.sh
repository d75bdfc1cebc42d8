#!/usr/bin/env bash
# Partition images: a bundle holding a bare ext4 filesystem also shows as "K.disk", a whole
# disk with one partition (the image at 1 MiB) that partitioning tools accept; a bundle holding
# a whole disk (with a partition table) gets no such view. Both layouts show in stats.json.
source "$(dirname "$0")/lib.sh"

make_keys cloud
B="$WORK/bucket"
mkdir -p "$B" "$WORK/tree/etc"
make_image "$WORK/tree/etc/blob" 3000000 31
echo "imgfs partition test" >"$WORK/tree/etc/motd"
truncate -s 24M "$WORK/root.img"
mkfs.ext4 -q -F -d "$WORK/tree" "$WORK/root.img"
"$IMGFS" bundle "$WORK/root.img" --cert "$WORK/cloud-cert.pem" --part-size 4M -d "$B" >/dev/null
# A whole disk: an MBR with one partition, the same filesystem inside.
truncate -s 26M "$WORK/whole.img"
echo 'start=2048, type=83' | sfdisk -q "$WORK/whole.img" >/dev/null
dd if="$WORK/root.img" of="$WORK/whole.img" bs=1M seek=1 conv=notrunc status=none
"$IMGFS" bundle "$WORK/whole.img" --cert "$WORK/cloud-cert.pem" --part-size 4M -d "$B" >/dev/null

M="$WORK/mnt"
mount_bucket "$B" "$M" partition --key "$WORK/cloud-pk.pem"
[ -e "$M/root.img.disk" ] || fail "no root.img.disk for a partition image"
[ ! -e "$M/whole.img.disk" ] || fail "a whole disk got a .disk view"
SIZE=$(stat -c %s "$M/root.img.disk")
[ $((SIZE % 1048576)) = 0 ] && [ "$SIZE" -ge $((25 * 1048576)) ] || fail "root.img.disk size $SIZE"
sfdisk -d "$M/root.img.disk" >"$WORK/table" || fail "sfdisk cannot read root.img.disk"
grep -q "start= *2048, size= *49152, type=83" "$WORK/table" || fail "partition table: $(cat "$WORK/table")"
cmp <(dd if="$M/root.img.disk" bs=1M skip=1 count=24 status=none) "$WORK/root.img" ||
  fail "the partition does not hold the image"
[ "$(dd if="$M/root.img.disk" bs=1M skip=25 status=none | tr -d '\0' | wc -c)" = 0 ] ||
  fail "the padding after the partition is not zeros"
blkid -p -O 1048576 "$M/root.img.disk" | grep -q 'TYPE="ext4"' || fail "blkid finds no ext4 at 1 MiB"
debugfs -R 'cat /etc/motd' "$M/root.img" 2>/dev/null | grep -q "imgfs partition test" ||
  fail "debugfs cannot read a file from the partition image"
STATS=$(cat "$M/.imgfs/stats.json")
echo "$STATS" | grep -q '"root.img":{[^}]*"layout":"partition","content":"ext4"' ||
  fail "stats do not report root.img as an ext4 partition image: $STATS"
echo "$STATS" | grep -q '"whole.img":{[^}]*"layout":"disk","content":"mbr"' ||
  fail "stats do not report whole.img as an MBR disk"
pass "a partition image shows as K.disk (MBR, partition at 1 MiB, sfdisk and blkid agree); a whole disk does not"
unmount "$M"
echo "all partition image checks passed"
