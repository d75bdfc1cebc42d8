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
# Without the background pass, which would fetch the rest at once.
mount_bucket "$B" "$M" lazy --key "$WORK/cloud-pk.pem" --no-background-index
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
mount_bucket "$B" "$MI" lazy --key "$WORK/cloud-pk.pem" --cache-size 1M --no-background-index
OFF=$((60 * 1048576 + 12345))
a=$(timeout 60 dd if="$MI/big.img" bs=4096 iflag=skip_bytes skip="$OFF" count=1 status=none | sha1sum)
b=$(dd if="$WORK/big.img" bs=4096 iflag=skip_bytes skip="$OFF" count=1 status=none | sha1sum)
[ "$a" = "$b" ] || fail "read through a saved index differs"
FAR=$(stat_field "$MI/.imgfs/stats.json" bytes_fetched)
[ "$FAR" -le $((4 * 1048576)) ] || fail "with a saved index, 4 KiB at 60 MiB fetched $FAR bytes"
unmount "$MI"
pass "a saved gzip index serves 4 KiB at 60 MiB after a remount for $FAR bytes fetched"

# Background indexing (the default): a 4 KiB read opens the image, and one pass inflates it to
# its end, checks it, saves its index and, with --publish-index, publishes it signed.
make_keys indexer
make_keys stranger
SRC=$(bucket_source "$B" published)
MB="$WORK/mnt-bg"
mount_source "$SRC" "$MB" bg --key "$WORK/cloud-pk.pem" --publish-index "$WORK/indexer-pk.pem"
timeout 30 dd if="$MB/big.img" of=/dev/null bs=4k count=1 status=none || fail "first read"
# imgfs prefetch joins the pass that read started and waits for it.
timeout 120 "$IMGFS" prefetch "$MB/big.img" >"$WORK/prefetch.out" 2>&1 ||
  fail "imgfs prefetch: $(cat "$WORK/prefetch.out")"
grep -q "big.img: ready" "$WORK/prefetch.out" || fail "imgfs prefetch said: $(cat "$WORK/prefetch.out")"
grep -q '"background_index":"done","indexed_percent":100\|"indexed_percent":100,.*"background_index":"done"' \
  "$MB/.imgfs/stats.json" || fail "the background pass did not finish: $(cat "$MB/.imgfs/stats.json")"
ls "$WORK/cache-bg/index/"*.gzi >/dev/null 2>&1 || fail "no index saved by the background pass"
grep -q "published the gzip index of big.img.manifest.xml" "$WORK/bg.log" || fail "not published"
[ ! -e "$MB/big.img.manifest.xml.imgfs-index" ] || fail "the published index shows in the mount"
unmount "$MB"
pass "a 4 KiB read started a background pass that indexed, saved and published the whole image"

# Another node, its cache empty, trusting the publisher: a far read costs about one part and one
# span. A node trusting another key ignores the published index.
MP="$WORK/mnt-pub"
mount_source "$SRC" "$MP" pub --key "$WORK/cloud-pk.pem" --index-key "$WORK/indexer-cert.pem" \
  --no-background-index
a=$(timeout 60 dd if="$MP/big.img" bs=4096 iflag=skip_bytes skip="$OFF" count=1 status=none | sha1sum)
[ "$a" = "$b" ] || fail "read through a published index differs"
PUB=$(stat_field "$MP/.imgfs/stats.json" bytes_fetched)
grep -q '"index_from_saved":true' "$MP/.imgfs/stats.json" || fail "the published index was not used"
[ "$PUB" -le $((4 * 1048576)) ] || fail "with a published index, 4 KiB at 60 MiB fetched $PUB bytes"
unmount "$MP"
MS="$WORK/mnt-stranger"
mount_source "$SRC" "$MS" stranger --key "$WORK/cloud-pk.pem" \
  --index-key "$WORK/stranger-cert.pem" --no-background-index
timeout 30 dd if="$MS/big.img" of=/dev/null bs=4k count=1 status=none || fail "stranger read"
grep -q '"index_from_saved":false' "$MS/.imgfs/stats.json" || fail "an index signed by an untrusted key was used"
unmount "$MS"
pass "a published index serves 4 KiB at 60 MiB on a fresh node for $PUB bytes; an untrusted signer's is ignored"

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
if timeout 120 "$IMGFS" prefetch --quiet "$M2/big.img" 2>"$WORK/prefetch-bad.err"; then
  fail "imgfs prefetch succeeded on a tampered bundle"
fi
grep -q "indexing failed" "$WORK/prefetch-bad.err" || fail "prefetch said: $(cat "$WORK/prefetch-bad.err")"
pass "a tampered part gives EIO after $GOOD good bytes, with a log line; imgfs prefetch fails"
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
