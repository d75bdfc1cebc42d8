#!/usr/bin/env bash
# Bundles made by `imgfs bundle` and by the shell pipeline, mounted from a local bucket folder
# and read through FUSE, compared byte for byte with the original images.
source "$(dirname "$0")/lib.sh"

make_keys cloud
make_keys user
make_keys stranger
B="$WORK/bucket"
mkdir -p "$B/imgfs" "$B/shell" "$B/other"

make_image "$WORK/a.img" 5000000 1           # not a multiple of 512, 1 MiB parts
make_image "$WORK/b.img" 3145728 2           # odd part size, not a multiple of 16
make_image "$WORK/c.img" 4194304 3           # user key path only
LONG=$(printf 'n%.0s' $(seq 1 100))          # a 100-byte name: needs a GNU LongLink header
make_image "$WORK/$LONG" 700001 4

"$IMGFS" bundle "$WORK/a.img" --cert "$WORK/cloud-cert.pem" --part-size 1M -d "$B/imgfs" >/dev/null
"$IMGFS" bundle "$WORK/b.img" --cert "$WORK/cloud-cert.pem" --part-size 1000003 -d "$B/imgfs" >/dev/null
"$IMGFS" bundle "$WORK/c.img" --cert "$WORK/stranger-cert.pem" --user-cert "$WORK/user-cert.pem" \
  --user-key "$WORK/user-pk.pem" --part-size 1M -d "$B/imgfs" >/dev/null
"$IMGFS" bundle "$WORK/$LONG" --cert "$WORK/cloud-cert.pem" --part-size 65536 -d "$B/imgfs" >/dev/null

# A zero-length last part: pick a part size that divides the ciphertext exactly.
make_image "$WORK/z.img" 1048576 5
"$IMGFS" bundle "$WORK/z.img" --cert "$WORK/cloud-cert.pem" --part-size 1M -d "$WORK/probe" >/dev/null
ZTOTAL=$(cat "$WORK"/probe/z.img.part.* | wc -c)
rm -rf "$WORK/probe"
"$IMGFS" bundle "$WORK/z.img" --cert "$WORK/cloud-cert.pem" --part-size $((ZTOTAL / 2)) -d "$B/imgfs" >/dev/null
# The ciphertext is a multiple of 16, so two parts of half of it fill it exactly.
[ -e "$B/imgfs/z.img.part.02" ] && [ ! -s "$B/imgfs/z.img.part.02" ] ||
  fail "no zero-length last part (total $ZTOTAL)"
pass "imgfs bundle wrote a zero-length last part"

shell_bundle "$WORK/a.img" a.img 1048576 "$WORK/cloud-cert.pem" "$B/shell"
shell_bundle "$WORK/b.img" b.img 999999 "$WORK/cloud-cert.pem" "$B/shell"
echo "plain object" >"$B/other/readme.txt"

# The reverse check: the full-copy shell pipeline restores what imgfs bundle wrote.
shell_unbundle "$B/imgfs" a.img "$WORK/cloud-pk.pem" >"$WORK/a.restored"
cmp "$WORK/a.img" "$WORK/a.restored" || fail "shell pipeline does not restore imgfs bundle a.img"
shell_unbundle "$B/imgfs" "$LONG" "$WORK/cloud-pk.pem" | cmp - "$WORK/$LONG" || fail "long name"
pass "openssl | gzip -dc | tar -xO restores imgfs bundles"

M="$WORK/mnt"
mount_bucket "$B" "$M" main --key "$WORK/cloud-pk.pem" --key "$WORK/user-pk.pem" --cache-size 64M
ls -l "$M/imgfs" "$M/shell"
[ "$(stat -c %s "$M/imgfs/a.img")" = 5000000 ] || fail "a.img size"
[ ! -e "$M/imgfs/a.img.part.00" ] && [ ! -e "$M/imgfs/a.img.manifest.xml" ] || fail "parts or manifests visible"
[ "$(cat "$M/other/readme.txt")" = "plain object" ] || fail "plain object"
for f in imgfs/a.img imgfs/b.img imgfs/c.img "imgfs/$LONG" imgfs/z.img shell/a.img shell/b.img; do
  src="$WORK/$(basename "$f")"
  timeout 120 cmp "$M/$f" "$src" || fail "$f differs from its image"
done
pass "every bundle reads back byte-identical through the mount"

# Random reads at odd offsets, compared with dd on the original.
for off in 0 1 511 512 1048575 1048576 2999999 4999000; do
  a=$(timeout 30 dd if="$M/imgfs/a.img" bs=1 skip="$off" count=1000 status=none | sha1sum)
  b=$(dd if="$WORK/a.img" bs=1 skip="$off" count=1000 status=none | sha1sum)
  [ "$a" = "$b" ] || fail "read at $off differs"
done
pass "reads at edges and boundaries match"

# Read-only: writes, creates, truncates, chmods and xattrs fail with EROFS.
for cmd in "touch $M/new" "cp $WORK/a.img $M/imgfs/x" "truncate -s 0 $M/imgfs/a.img" \
           "chmod 600 $M/imgfs/a.img" "mkdir $M/d" "rm $M/imgfs/a.img" \
           "setfattr -n user.x -v 1 $M/imgfs/a.img"; do
  if out=$(eval "$cmd" 2>&1); then fail "'$cmd' succeeded"; fi
  case "$out" in *"Read-only file system"*) ;; *) fail "'$cmd': $out" ;; esac
done
pass "the mount is read-only (EROFS)"

grep -q '"images"' "$M/.imgfs/stats.json" || fail "stats.json"
SERVED=$(stat_field "$M/.imgfs/stats.json" bytes_served)
[ "$SERVED" -gt 0 ] || fail "stats.json bytes_served"
pass "stats.json reports bytes_served=$SERVED"
MEMORY=$(grep -o '"memory":{[^}]*}' "$M/.imgfs/stats.json") || fail "stats.json has no memory"
LIMIT=$(echo "$MEMORY" | grep -o '"limit":[0-9]*' | cut -d: -f2)
PARTS=$(echo "$MEMORY" | grep -o '"parts":[0-9]*' | cut -d: -f2)
SPANS=$(echo "$MEMORY" | grep -o '"spans":[0-9]*' | cut -d: -f2)
AHEAD=$(echo "$MEMORY" | grep -o '"read_ahead":[0-9]*' | cut -d: -f2)
[ "$LIMIT" -eq $((256 << 20)) ] || fail "memory limit $LIMIT"
[ "$PARTS" -gt 0 ] && [ "$PARTS" -le $((64 << 20)) ] || fail "verified parts in memory: $PARTS"
[ "$SPANS" -le $((16 << 20)) ] || fail "inflated spans in memory: $SPANS"
[ $((PARTS + SPANS + AHEAD)) -le "$LIMIT" ] || fail "memory over the limit: $MEMORY"
pass "stats.json memory within --memory-limit: $MEMORY"
unmount "$M"

# A mount without the right key: the images still appear, reads fail with EIO and one log line,
# and other files keep working.
M2="$WORK/mnt2"
mount_bucket "$B" "$M2" nokey --key "$WORK/stranger-pk.pem"
[ "$(stat -c %s "$M2/imgfs/a.img")" = 5000000 ] || fail "image without key must still appear"
if out=$(timeout 30 dd if="$M2/imgfs/a.img" of=/dev/null bs=4k count=1 2>&1); then fail "read without key"; fi
case "$out" in *"Input/output error"*) ;; *) fail "expected EIO, got: $out" ;; esac
grep -q "imgfs/a.img" "$WORK/nokey.log" || fail "no log line naming the image"
timeout 60 cmp "$M2/imgfs/c.img" "$WORK/c.img" || fail "user-key bundle with the stranger's ec2 key"
[ "$(cat "$M2/other/readme.txt")" = "plain object" ] || fail "other files must keep working"
pass "wrong key gives EIO and a log line; other images keep working"
unmount "$M2"

# --verify-cert: the signed bundle opens; unsigned ones appear but fail with EIO and a log line.
M4="$WORK/mnt4"
mount_bucket "$B" "$M4" verify --key "$WORK/user-pk.pem" --key "$WORK/cloud-pk.pem" \
  --verify-cert "$WORK/user-cert.pem"
timeout 60 cmp "$M4/imgfs/c.img" "$WORK/c.img" || fail "signed bundle with --verify-cert"
if timeout 30 head -c 1 "$M4/imgfs/a.img" >/dev/null 2>&1; then fail "unsigned bundle served under --verify-cert"; fi
grep -q "imgfs/a.img.*unsigned" "$WORK/verify.log" || fail "no log line for the unsigned bundle"
unmount "$M4"
pass "--verify-cert accepts the signed bundle and refuses unsigned ones"

# A bad manifest and a missing part: the images still appear, reads fail with EIO and a log
# line naming the image and the cause.
mkdir -p "$WORK/broken/ok"
cp "$B"/imgfs/b.img.* "$WORK/broken/ok/"
cp "$B"/imgfs/a.img.* "$WORK/broken/"
rm "$WORK/broken/a.img.part.02"
echo "<manifest><version>2007-10-10</version>" >"$WORK/broken/bad.img.manifest.xml"
M5="$WORK/mnt5"
mount_bucket "$WORK/broken" "$M5" broken --key "$WORK/cloud-pk.pem"
[ -e "$M5/bad.img" ] && [ -e "$M5/a.img" ] || fail "broken bundles must still appear"
for f in bad.img a.img; do
  if out=$(timeout 30 cat "$M5/$f" 2>&1 >/dev/null); then fail "$f served"; fi
  case "$out" in *"Input/output error"*) ;; *) fail "$f: expected EIO, got: $out" ;; esac
done
grep -q "image bad.img: .*Corruption" "$WORK/broken.log" || fail "no log line for the bad manifest"
grep -q "image a.img: .*a.img.part.02" "$WORK/broken.log" || fail "no log line for the missing part"
timeout 60 cmp "$M5/ok/b.img" "$WORK/b.img" || fail "the good bundle beside broken ones"
unmount "$M5"
pass "a bad manifest and a missing part give EIO and a log line; the rest keeps working"

# Key files readable by others are refused, as ssh does.
cp "$WORK/cloud-pk.pem" "$WORK/open-pk.pem"
chmod 644 "$WORK/open-pk.pem"
if out=$("$IMGFS" mount "$B" "$WORK/mnt3" --key "$WORK/open-pk.pem" 2>&1); then fail "loose key accepted"; fi
case "$out" in *"group or others"*) ;; *) fail "unclear message for a loose key: $out" ;; esac
pass "a key file readable by others is refused"

# imgfs cat reads through the same engine without FUSE.
"$IMGFS" cat "$B/imgfs/b.img" --key "$WORK/cloud-pk.pem" | cmp - "$WORK/b.img" || fail "imgfs cat"
"$IMGFS" cat "$B/imgfs/b.img" --key "$WORK/cloud-pk.pem" --offset 1000 --length 5000 |
  cmp - <(dd if="$WORK/b.img" bs=1 skip=1000 count=5000 status=none) || fail "imgfs cat range"
"$IMGFS" verify "$B/shell/a.img" --key "$WORK/cloud-pk.pem" >/dev/null || fail "imgfs verify"
pass "imgfs cat and verify"
echo "all bundle mount checks passed"
