#!/usr/bin/env bash
# Laziness and integrity: a 4 KiB read of a 64 MiB bundle with 1 MiB parts fetches at most two
# parts; random reads match; a tampered part or a wrong digest gives EIO, never bytes.
source "$(dirname "$0")/lib.sh"

make_keys cloud
B="$WORK/bucket"
mkdir -p "$B"
make_image "$WORK/big.img" $((64 * 1048576)) 7
"$IMGFS" bundle "$WORK/big.img" --cert "$WORK/cloud-cert.pem" --part-size 1M -d "$B" >/dev/null
PARTS=$(ls "$B"/big.img.part.* | wc -l)

M="$WORK/mnt"
mount_bucket "$B" "$M" lazy --key "$WORK/cloud-pk.pem"
timeout 30 dd if="$M/big.img" of="$WORK/first4k" bs=4k count=1 status=none || fail "first read"
cmp "$WORK/first4k" <(head -c 4096 "$WORK/big.img") || fail "first 4 KiB differ"
FETCHED=$(stat_field "$M/.imgfs/stats.json" bytes_fetched)
echo "first 4 KiB of a $PARTS-part bundle fetched $FETCHED bytes"
[ "$FETCHED" -le $((2 * 1048576)) ] || fail "fetched $FETCHED bytes (more than 2 parts) for 4 KiB"
pass "4 KiB at offset 0 fetched $FETCHED bytes (at most 2 parts of $PARTS)"

for i in $(seq 1 40); do
  off=$(( (i * 1664525 + 1013904223) % (64 * 1048576 - 8192) ))
  a=$(timeout 60 dd if="$M/big.img" bs=4096 iflag=skip_bytes skip="$off" count=1 status=none | sha1sum)
  b=$(dd if="$WORK/big.img" bs=4096 iflag=skip_bytes skip="$off" count=1 status=none | sha1sum)
  [ "$a" = "$b" ] || fail "random read at $off differs"
done
pass "40 random 4 KiB reads match"

# Two readers at once share one inflation and both get the right bytes.
timeout 120 cmp "$M/big.img" "$WORK/big.img" & r1=$!
timeout 120 cmp "$M/big.img" "$WORK/big.img" & r2=$!
wait $r1 || fail "concurrent reader 1"
wait $r2 || fail "concurrent reader 2"
pass "two concurrent full reads are byte-identical"
unmount "$M"

# The full reads built the gzip index, saved in the cache folder: a new mount with the same
# cache folder (whose block cache holds only 1 MiB) reads far into the image from the nearest
# checkpoint instead of inflating from the start.
# (The daemon saves it on release and at unmount, both after the reader or fusermount returns.)
for _ in $(seq 1 50); do ls "$WORK/cache-lazy/index/"*.gzi >/dev/null 2>&1 && break; sleep 0.2; done
ls "$WORK/cache-lazy/index/"*.gzi >/dev/null 2>&1 || fail "no saved gzip index"
MI="$WORK/mnt-index"
mount_bucket "$B" "$MI" lazy --key "$WORK/cloud-pk.pem" --cache-size 1M
OFF=$((60 * 1048576 + 12345))
a=$(timeout 60 dd if="$MI/big.img" bs=4096 iflag=skip_bytes skip="$OFF" count=1 status=none | sha1sum)
b=$(dd if="$WORK/big.img" bs=4096 iflag=skip_bytes skip="$OFF" count=1 status=none | sha1sum)
[ "$a" = "$b" ] || fail "read through a saved index differs"
FAR=$(stat_field "$MI/.imgfs/stats.json" bytes_fetched)
[ "$FAR" -le $((4 * 1048576)) ] || fail "with a saved index, 4 KiB at 60 MiB fetched $FAR bytes"
unmount "$MI"
pass "a saved gzip index serves 4 KiB at 60 MiB after a remount for $FAR bytes fetched"

# Integrity: flip one byte inside a middle part. Its SHA1 no longer matches the manifest.
cp -r "$B" "$WORK/tampered"
printf '\xff' | dd of="$WORK/tampered/big.img.part.10" bs=1 seek=1000 conv=notrunc status=none
M2="$WORK/mnt2"
mount_bucket "$WORK/tampered" "$M2" tampered --key "$WORK/cloud-pk.pem"
timeout 30 dd if="$M2/big.img" of=/dev/null bs=4k count=1 status=none || fail "part 0 is intact"
if timeout 120 cat "$M2/big.img" >"$WORK/tampered.out" 2>"$WORK/tampered.err"; then
  fail "a tampered part was served"
fi
grep -q "Input/output error" "$WORK/tampered.err" || fail "expected EIO: $(cat "$WORK/tampered.err")"
grep -q "SHA1 mismatch" "$WORK/tampered.log" || fail "no SHA1 mismatch log line"
GOOD=$(stat -c %s "$WORK/tampered.out")
cmp -n "$GOOD" "$WORK/tampered.out" "$WORK/big.img" || fail "bytes served before the EIO are wrong"
pass "a tampered part gives EIO after $GOOD good bytes, with a log line"
unmount "$M2"

# A manifest whose image digest is wrong: the stream end fails, so a full read ends in EIO.
cp -r "$B" "$WORK/badsum"
sed -i 's:<digest algorithm="SHA1">[0-9a-f]*</digest><size>:<digest algorithm="SHA1">0000000000000000000000000000000000000000</digest><size>:' \
  "$WORK/badsum/big.img.manifest.xml"
M3="$WORK/mnt3"
mount_bucket "$WORK/badsum" "$M3" badsum --key "$WORK/cloud-pk.pem"
if timeout 120 cat "$M3/big.img" >/dev/null 2>"$WORK/badsum.err"; then fail "digest mismatch not detected"; fi
grep -q "SHA1 mismatch" "$WORK/badsum.log" || fail "no digest mismatch log line"
pass "a wrong tar digest gives EIO at the end, with a log line"
unmount "$M3"
echo "all laziness and integrity checks passed"
