#!/usr/bin/env bash
# S3 itself, against s3rver on 127.0.0.1: import manifests (10 MiB and odd parts, a part only
# reachable through its get-url, a VMDK label on bytes that are not VMDK), paging past 1000 keys, keys
# with spaces and plus signs, a prefix mount, and faults injected by our proxy: 503 SlowDown,
# 500, resets, short bodies and delays are retried to byte-identical reads; a part that keeps
# failing gives EIO in bounded time while other images work; a dead endpoint fails over.
export IMGFS_TEST_STORE=${IMGFS_TEST_STORE:-s3}
source "$(dirname "$0")/lib.sh"

make_keys cloud
B="$WORK/bucket"
mkdir -p "$B/many"
make_image "$WORK/disk.raw" $((25 * 1048576 + 1234)) 11
make_image "$WORK/odd.raw" 7000001 12
make_image "$WORK/url.raw" 3000000 13
import_manifest "$WORK/disk.raw" disk.raw 10485760 RAW "$B" "imports/7c1e0000-aaaa"
import_manifest "$WORK/odd.raw" odd.raw 3333333 RAW "$B" "imports/7c1e0000-bbbb"
import_manifest "$WORK/odd.raw" stream.vmdk 3333333 VMDK "$B" "imports/7c1e0000-cccc"
# url.raw: part 1 lives in another bucket and is reachable only through its get-url.
import_manifest "$WORK/url.raw" url.raw 1048576 RAW "$B" "imports/7c1e0000-dddd"
mkdir -p "$WORK/elsewhere"
mv "$B/imports/7c1e0000-dddd/url.raw.part.1" "$WORK/elsewhere/"
curl -sf -X PUT "$S3_ENDPOINT/elsewhere" >/dev/null
s3_put elsewhere "parts/url.raw.part.1" "$WORK/elsewhere/url.raw.part.1" >/dev/null
sed -i "s|<key>imports/7c1e0000-dddd/url.raw.part.1</key><head-url>[^<]*</head-url><get-url>[^<]*</get-url>|<key>imports/7c1e0000-dddd/url.raw.part.1</key><head-url>$S3_ENDPOINT/elsewhere/parts/url.raw.part.1</head-url><get-url>$S3_ENDPOINT/elsewhere/parts/url.raw.part.1?X-Amz-Expires=604800</get-url>|" \
  "$B/imports/7c1e0000-dddd/url.raw.manifest.xml"
make_image "$WORK/sp.img" 2000000 14
"$IMGFS" bundle "$WORK/sp.img" --cert "$WORK/cloud-cert.pem" --prefix "my disk+1.img" \
  --part-size 1M -d "$B/odd names" >/dev/null
for i in $(seq 1 1100); do echo "$i" >"$B/many/object-$i"; done

M="$WORK/mnt"
mount_bucket "$B" "$M" main --key "$WORK/cloud-pk.pem"
for path in 7c1e0000-aaaa/disk.raw 7c1e0000-bbbb/odd.raw 7c1e0000-dddd/url.raw; do
  f=$(basename "$path")
  [ "$(stat -c %s "$M/imports/$path")" = "$(stat -c %s "$WORK/$f")" ] || fail "$f size"
  timeout 120 cmp "$M/imports/$path" "$WORK/$f" || fail "import $f differs"
done
[ ! -e "$M/imports/7c1e0000-aaaa/disk.raw.part.0" ] || fail "import parts must be hidden"
pass "RAW imports (10 MiB parts, odd parts, a part only behind its get-url) read byte-identical"
if timeout 30 head -c 1 "$M/imports/7c1e0000-cccc/stream.vmdk" >/dev/null 2>&1; then
  fail "an import labelled VMDK whose bytes are not VMDK was served"
fi
grep -q "stream.vmdk.*Corruption" "$WORK/main.log" || fail "no log line for the bad VMDK import"
pass "an import labelled VMDK whose bytes are not VMDK appears and fails with EIO and a log line"
[ "$(ls "$M/many" | wc -l)" = 1100 ] || fail "listing past 1000 keys: $(ls "$M/many" | wc -l)"
[ "$(cat "$M/many/object-1077")" = 1077 ] || fail "object-1077"
pass "listing pages past 1000 keys"
timeout 60 cmp "$M/odd names/my disk+1.img" "$WORK/sp.img" || fail "key with a space and a plus"
pass "keys with spaces and plus signs"
unmount "$M"

# A Eucalyptus 4 download manifest: the bundle's key and IV wrapped again for the node's key,
# parts by get-url, signed SHA256withRSA by the cloud key over version+file-format+bundle+image.
make_keys node
DL="$WORK/dlsrc"
"$IMGFS" bundle "$WORK/odd.raw" --cert "$WORK/cloud-cert.pem" --part-size 1M -d "$DL" >/dev/null
curl -sf -X PUT "$S3_ENDPOINT/euca-bundles" >/dev/null
s3_put_tree euca-bundles "$DL" >/dev/null
BM="$DL/odd.raw.manifest.xml"
rewrap() { sed -n "s:.*<$1[^>]*>\([0-9a-f]*\)</$1>.*:\1:p" "$BM" | xxd -r -p |
  openssl pkeyutl -decrypt -inkey "$WORK/cloud-pk.pem" -pkeyopt rsa_padding_mode:pkcs1 |
  openssl pkeyutl -encrypt -certin -inkey "$WORK/node-cert.pem" -pkeyopt rsa_padding_mode:pkcs1 |
  xxd -p | tr -d '\n'; }
DPARTS="" n=0
for f in $(cd "$DL" && ls odd.raw.part.* | sort); do
  DPARTS+="<part index=\"$n\"><get-url>$S3_ENDPOINT/euca-bundles/$f?X-Amz-Expires=10800</get-url><digest algorithm=\"SHA1\">$(sha1sum <"$DL/$f" | cut -d' ' -f1)</digest></part>"
  n=$((n + 1))
done
SIGNED="<version>2014-01-14</version><file-format>BUNDLE</file-format><bundle><encrypted-key>$(rewrap ec2_encrypted_key)</encrypted-key><encrypted-iv>$(rewrap ec2_encrypted_iv)</encrypted-iv><unbundled-size>$(stat -c %s "$WORK/odd.raw")</unbundled-size></bundle><image><size>$(cat "$DL"/odd.raw.part.* | wc -c)</size><parts count=\"$n\">$DPARTS</parts></image>"
SIG=$(printf %s "$SIGNED" | openssl dgst -sha256 -sign "$WORK/cloud-pk.pem" | xxd -p | tr -d '\n' | tr a-f A-F)
mkdir -p "$B/download-manifests"
printf '<?xml version="1.0" encoding="UTF-8"?><manifest>%s<signature algorithm="RSA-SHA256">%s</signature></manifest>' \
  "$SIGNED" "$SIG" >"$B/download-manifests/odd.raw.manifest.xml"
MD="$WORK/mnt-download"
mount_bucket "$B" "$MD" download --key "$WORK/node-pk.pem" --verify-cert "$WORK/cloud-cert.pem"
timeout 60 cmp "$MD/download-manifests/odd.raw" "$WORK/odd.raw" || fail "download manifest bundle"
unmount "$MD"
sed -i 's:<unbundled-size>:<unbundled-size>1:' "$B/download-manifests/odd.raw.manifest.xml"
MD2="$WORK/mnt-download2"
mount_bucket "$B" "$MD2" download2 --key "$WORK/node-pk.pem" --verify-cert "$WORK/cloud-cert.pem"
if timeout 30 head -c 1 "$MD2/download-manifests/odd.raw" >/dev/null 2>&1; then fail "tampered download manifest served"; fi
grep -q "download manifest signature" "$WORK/download2.log" || fail "no signature log line"
unmount "$MD2"
rm -r "$B/download-manifests"
pass "a Eucalyptus 4 download manifest opens with the node key and its signature is checked"

# The listing is kept for --list-ttl, then taken again: a new object appears, a removed one goes.
ML="$WORK/mnt-ttl"
mount_bucket "$B" "$ML" ttl --list-ttl 1
TTL_BUCKET=$(sed -n 's:.*mounted s3\://\([^ ]*\) via.*:\1:p' "$WORK/ttl.log")
[ ! -e "$ML/late/new.txt" ] || fail "object present before upload"
echo "late object" >"$WORK/new.txt"
s3_put "$TTL_BUCKET" "late/new.txt" "$WORK/new.txt" >/dev/null
curl -sf -X DELETE "$S3_ENDPOINT/$TTL_BUCKET/many/object-7" >/dev/null
sleep 2
ls "$ML" >/dev/null
[ "$(cat "$ML/late/new.txt" 2>/dev/null)" = "late object" ] || fail "new object not listed after the TTL"
[ ! -e "$ML/many/object-7" ] || fail "deleted object still listed after the TTL"
unmount "$ML"
pass "the listing is taken again after --list-ttl"

# A prefix mount shows only that folder.
BUCKET=$(s3_bucket_of "$B" prefix)
MP="$WORK/mnt-prefix"
mkdir -p "$MP"
"$IMGFS" mount "s3://$BUCKET/imports/7c1e0000-bbbb" "$MP" --endpoint "$S3_ENDPOINT" \
  --cache-dir "$WORK/cache-prefix" --log-file "$WORK/prefix.log" || fail "prefix mount"
MOUNTS+=("$MP")
[ "$(ls "$MP")" = "odd.raw" ] || fail "prefix mount shows: $(ls "$MP")"
timeout 60 cmp "$MP/odd.raw" "$WORK/odd.raw" || fail "prefix mount read"
unmount "$MP"
pass "a prefix mount shows only its folder"

# An object that changes under a mounted image: its reads fail with EIO, never mixed bytes.
MC="$WORK/mnt-changed"
mount_bucket "$B" "$MC" changed
CHANGED_BUCKET=$(sed -n 's:.*mounted s3\://\([^ ]*\) via.*:\1:p' "$WORK/changed.log")
timeout 30 dd if="$MC/imports/7c1e0000-bbbb/odd.raw" of=/dev/null bs=4k count=1 status=none ||
  fail "first read before the change"
head -c 3333333 /dev/zero >"$WORK/zero.part"
s3_put "$CHANGED_BUCKET" "imports/7c1e0000-bbbb/odd.raw.part.1" "$WORK/zero.part" >/dev/null
if timeout 60 dd if="$MC/imports/7c1e0000-bbbb/odd.raw" of=/dev/null bs=64k skip=60 count=1 \
  status=none 2>"$WORK/changed.err"; then
  fail "a changed object was served"
fi
grep -q "changed since it was opened" "$WORK/changed.log" || fail "no log line for the changed object"
unmount "$MC"
pass "an object changed under a mounted image gives EIO and a log line"

# TLS: an HTTPS endpoint (our proxy with a certificate for 127.0.0.1) is verified by default;
# --ca-file trusts it, --insecure skips the check (with a warning in the log).
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1 \
  -addext "subjectAltName=IP:127.0.0.1" -keyout "$WORK/tls-key.pem" -out "$WORK/tls-cert.pem" 2>/dev/null
fault_start "$S3_ENDPOINT" "$WORK/tls-cert.pem" "$WORK/tls-key.pem" >/dev/null
TLS_ENDPOINT=$FAULT_ENDPOINT
MT="$WORK/mnt-tls"
mkdir -p "$MT"
if "$IMGFS" mount "s3://$BUCKET" "$MT" --endpoint "$TLS_ENDPOINT" --retries 1 --timeout 5 \
  --cache-dir "$WORK/cache-tls0" --log-file "$WORK/tls0.log" 2>"$WORK/tls0.err"; then
  MOUNTS+=("$MT")
  fail "an untrusted TLS certificate was accepted"
fi
"$IMGFS" mount "s3://$BUCKET" "$MT" --endpoint "$TLS_ENDPOINT" --ca-file "$WORK/tls-cert.pem" \
  --cache-dir "$WORK/cache-tls1" --log-file "$WORK/tls1.log" || fail "mount with --ca-file"
MOUNTS+=("$MT")
timeout 60 cmp "$MT/imports/7c1e0000-bbbb/odd.raw" "$WORK/odd.raw" || fail "read over TLS"
unmount "$MT"
"$IMGFS" mount "s3://$BUCKET" "$MT" --endpoint "$TLS_ENDPOINT" --insecure \
  --cache-dir "$WORK/cache-tls2" --log-file "$WORK/tls2.log" || fail "mount with --insecure"
MOUNTS+=("$MT")
[ -e "$MT/imports/7c1e0000-bbbb/odd.raw" ] || fail "listing with --insecure"
grep -q "insecure" "$WORK/tls2.log" || fail "no warning for --insecure"
unmount "$MT"
fault_stop "$FAULT_PID" >/dev/null
pass "TLS is verified by default; --ca-file trusts a CA; --insecure warns"

# Faults, through our proxy in front of s3rver: each mode on a fresh mount (empty cache).
fault_start "$S3_ENDPOINT" >/dev/null
PROXY=$FAULT_ENDPOINT
PROXY_PID=$FAULT_PID
for mode in 503 500 reset short delay=300; do
  MF="$WORK/mnt-fault"
  mkdir -p "$MF"
  "$IMGFS" mount "s3://$BUCKET" "$MF" --endpoint "$PROXY" --retries 5 --timeout 5 \
    --cache-dir "$WORK/cache-fault-$mode" --log-file "$WORK/fault.log" || fail "fault mount"
  MOUNTS+=("$MF")
  fault_arm "$mode" 3 "disk.raw.part.1" "$PROXY" >/dev/null
  timeout 120 cmp "$MF/imports/7c1e0000-aaaa/disk.raw" "$WORK/disk.raw" || fail "$mode: bytes differ"
  injected=$(fault_stats "$PROXY" | grep -o "\"${mode%%=*}\":[0-9]*" | cut -d: -f2)
  [ "${injected:-0}" -ge 1 ] || fail "$mode: the proxy injected no fault: $(fault_stats "$PROXY")"
  fault_clear "$PROXY" >/dev/null
  unmount "$MF"
done
pass "503, 500, reset, short body and delay are retried to byte-identical reads"

# A part that keeps failing: EIO within the retry budget, and the other images keep working.
MF="$WORK/mnt-dead"
mkdir -p "$MF"
"$IMGFS" mount "s3://$BUCKET" "$MF" --endpoint "$PROXY" --retries 2 --timeout 2 \
  --cache-dir "$WORK/cache-dead" --log-file "$WORK/dead.log" || fail "dead-part mount"
MOUNTS+=("$MF")
fault_arm 503 -1 "odd.raw.part.1" "$PROXY" >/dev/null
start=$(date +%s)
if timeout 60 cat "$MF/imports/7c1e0000-bbbb/odd.raw" >/dev/null 2>"$WORK/dead.err"; then
  fail "a permanently failing part was served"
fi
took=$(( $(date +%s) - start ))
grep -q "Input/output error" "$WORK/dead.err" || fail "expected EIO: $(cat "$WORK/dead.err")"
[ "$took" -le 30 ] || fail "EIO took ${took}s"
grep -q "503" "$WORK/dead.log" || fail "no log line with the HTTP status"
timeout 60 cmp "$MF/imports/7c1e0000-aaaa/disk.raw" "$WORK/disk.raw" || fail "other image after a dead part"
fault_clear "$PROXY" >/dev/null
unmount "$MF"
pass "a permanently failing part gives EIO in ${took}s; other images keep working"

# Failover: two endpoints; the first dies mid-read and requests move to the second.
fault_start "$S3_ENDPOINT" >/dev/null
SECOND=$FAULT_ENDPOINT
MF="$WORK/mnt-failover"
mkdir -p "$MF"
"$IMGFS" mount "s3://$BUCKET" "$MF" --endpoint "$PROXY" --endpoint "$SECOND" --retries 5 \
  --timeout 5 --cache-dir "$WORK/cache-failover" --log-file "$WORK/failover.log" || fail "failover mount"
MOUNTS+=("$MF")
timeout 30 dd if="$MF/imports/7c1e0000-aaaa/disk.raw" of=/dev/null bs=4k count=1 status=none
fault_stop "$PROXY_PID" >/dev/null
timeout 120 cmp "$MF/imports/7c1e0000-aaaa/disk.raw" "$WORK/disk.raw" || fail "failover read"
FAILOVERS=$(stat_field "$MF/.imgfs/stats.json" failovers)
grep -q "\"endpoint\":\"$SECOND\"" "$MF/.imgfs/stats.json" || fail "endpoint not moved: $(cat "$MF/.imgfs/stats.json" | head -c 300)"
[ "$FAILOVERS" -ge 1 ] || fail "no failover counted"
unmount "$MF"
pass "a dead endpoint fails over to the next ($FAILOVERS failovers)"
echo "all S3 checks passed"
