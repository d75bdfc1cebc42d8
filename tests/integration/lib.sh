# Shared helpers for the FUSE integration tests. Source it with the imgfs binary as $1.
# Every test works in its own temp folder and unmounts and removes everything on exit.
#
# IMGFS_TEST_STORE picks where mount_bucket serves a bucket folder from, so the same test bodies
# run against every store: "dir" (the folder itself, the default), "s3" (uploaded to s3rver on
# 127.0.0.1, SigV4) or "s3v2" (the same with --sigv2, which s3rver verifies).
set -euo pipefail
IMGFS=$(readlink -f "$1")
STORE=${IMGFS_TEST_STORE:-dir}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=$(mktemp -d /tmp/imgfs-it.XXXXXX)
MOUNTS=()
cleanup() {
  for m in "${MOUNTS[@]}"; do fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
if [ "$STORE" != dir ]; then
  # shellcheck source=../support/s3rver_harness.sh
  source "$REPO/tests/support/s3rver_harness.sh"
  s3_start "$WORK/s3data" imgfs-seed >/dev/null
  export AWS_ACCESS_KEY_ID=S3RVER AWS_SECRET_ACCESS_KEY=S3RVER
  unset AWS_SESSION_TOKEN AWS_PROFILE
fi

fail() {
  echo "FAIL: $*" >&2
  for log in "$WORK"/*.log; do [ -f "$log" ] && { echo "--- $log" >&2; tail -20 "$log" >&2; }; done
  exit 1
}
pass() { echo "ok: $*"; }

# make_keys NAME: an RSA-2048 key (mode 600) and a self-signed certificate for it.
make_keys() {
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=$1" \
    -keyout "$WORK/$1-pk.pem" -out "$WORK/$1-cert.pem" 2>/dev/null
  chmod 600 "$WORK/$1-pk.pem"
}

# make_image PATH BYTES SEED: deterministic data that mixes incompressible runs, zero runs and
# text, so gzip has work of every kind.
make_image() {
  local path=$1 bytes=$2 seed=$3
  # openssl dies of SIGPIPE once head has enough; that is expected.
  { openssl enc -aes-128-ctr -nosalt -K "$(printf '%032x' "$seed")" -iv 0 </dev/zero 2>/dev/null ||
    true; } | head -c "$bytes" >"$path"
  if [ "$bytes" -gt 3000000 ]; then
    dd if=/dev/zero of="$path" bs=1 seek=1000000 count=1500000 conv=notrunc status=none
    { yes "imgfs line of text $seed" || true; } | head -c 400000 |
      dd of="$path" bs=1 seek=2600000 conv=notrunc status=none
  fi
}

# shell_bundle IMAGE NAME PART_SIZE CERT OUTDIR: a bundle made without imgfs, the way
# euca-bundle-image does it: tar | gzip | openssl enc -aes-128-cbc | split, plus a manifest
# whose AES key and IV (as 32 hex characters) are wrapped with `openssl pkeyutl`.
shell_bundle() {
  local image=$1 name=$2 part_size=$3 cert=$4 out=$5
  local tmp="$WORK/shell-$name"
  mkdir -p "$tmp" "$out"
  ln -sf "$(readlink -f "$image")" "$tmp/$name"
  local key iv
  key=$(openssl rand -hex 16)
  iv=$(openssl rand -hex 16)
  tar -C "$tmp" -chf "$tmp/stream.tar" "$name"
  local digest
  digest=$(sha1sum <"$tmp/stream.tar" | cut -d' ' -f1)
  gzip -c "$tmp/stream.tar" | openssl enc -e -aes-128-cbc -K "$key" -iv "$iv" >"$tmp/cipher"
  local total
  total=$(stat -c %s "$tmp/cipher")
  split -b "$part_size" -d -a 2 "$tmp/cipher" "$out/$name.part."
  if [ $((total % part_size)) -eq 0 ]; then
    : >"$out/$name.part.$(printf '%02d' $((total / part_size)))"
  fi
  wrap() { printf %s "$1" | openssl pkeyutl -encrypt -certin -inkey "$cert" \
    -pkeyopt rsa_padding_mode:pkcs1 | xxd -p | tr -d '\n'; }
  local parts="" count=0 f
  for f in $(cd "$out" && ls "$name".part.* | sort); do
    parts+="<part index=\"$count\"><filename>$f</filename><digest algorithm=\"SHA1\">$(sha1sum <"$out/$f" | cut -d' ' -f1)</digest></part>"
    count=$((count + 1))
  done
  {
    printf "<?xml version='1.0' encoding='ASCII'?>\n"
    printf '<manifest><version>2007-10-10</version><bundler><name>shell</name><version>1</version><release>0</release></bundler>'
    printf '<machine_configuration><architecture>x86_64</architecture></machine_configuration>'
    printf '<image><name>%s</name><user>000000000000</user><type>machine</type>' "$name"
    printf '<digest algorithm="SHA1">%s</digest><size>%s</size><bundled_size>%s</bundled_size>' \
      "$digest" "$(stat -L -c %s "$image")" "$total"
    printf '<ec2_encrypted_key algorithm="AES-128-CBC">%s</ec2_encrypted_key>' "$(wrap "$key")"
    printf '<user_encrypted_key algorithm="AES-128-CBC"></user_encrypted_key>'
    printf '<ec2_encrypted_iv>%s</ec2_encrypted_iv><user_encrypted_iv></user_encrypted_iv>' "$(wrap "$iv")"
    printf '<parts count="%s">%s</parts></image><signature>UNSIGNED</signature></manifest>' "$count" "$parts"
  } >"$out/$name.manifest.xml"
  rm -rf "$tmp"
}

# shell_unbundle MANIFEST_DIR NAME KEY: the full-copy path (openssl, gzip, tar) to stdout.
shell_unbundle() {
  local dir=$1 name=$2 key=$3
  local m="$dir/$name.manifest.xml"
  unwrap() { xxd -r -p | openssl pkeyutl -decrypt -inkey "$key" -pkeyopt rsa_padding_mode:pkcs1; }
  local k iv
  k=$(sed -n 's:.*<ec2_encrypted_key[^>]*>\([0-9a-f]*\)</ec2_encrypted_key>.*:\1:p' "$m" | unwrap)
  iv=$(sed -n 's:.*<ec2_encrypted_iv>\([0-9a-f]*\)</ec2_encrypted_iv>.*:\1:p' "$m" | unwrap)
  local parts
  parts=$(grep -o '<filename>[^<]*</filename>' "$m" | sed 's:</*filename>::g' | sed "s:^:$dir/:")
  # shellcheck disable=SC2086
  cat $parts | openssl enc -d -aes-128-cbc -K "$k" -iv "$iv" | gzip -dc | tar -xO
}

# s3_bucket_of FOLDER NAME: uploads FOLDER into a new s3rver bucket and prints its name.
s3_bucket_of() {
  # Called in a subshell ($(...)), so the name's uniqueness cannot come from a counter.
  local bucket
  bucket="it-$RANDOM$RANDOM-$(echo "$2" | tr -c 'a-z0-9\n' '-')"
  curl -sf -X PUT "$S3_ENDPOINT/$bucket" >/dev/null || fail "cannot create bucket $bucket"
  s3_put_tree "$bucket" "$1" >/dev/null || fail "cannot upload $1"
  echo "$bucket"
}

# bucket_source FOLDER NAME: what imgfs mounts for the bucket FOLDER stands for: the folder
# itself, or a new s3rver bucket holding a copy of it.
bucket_source() {
  case "$STORE" in
    s3 | s3v2) echo "s3://$(s3_bucket_of "$1" "$2")" ;;
    *) echo "$1" ;;
  esac
}

# mount_source SOURCE MOUNTPOINT NAME [imgfs options...]: mounts SOURCE (from bucket_source),
# logging to $WORK/NAME.log, with the store options the test store needs.
mount_source() {
  local source=$1 mnt=$2 name=$3
  shift 3
  mkdir -p "$mnt"
  local store_options=()
  case "$STORE" in
    s3) store_options=(--endpoint "$S3_ENDPOINT") ;;
    s3v2) store_options=(--endpoint "$S3_ENDPOINT" --sigv2) ;;
  esac
  timeout 60 "$IMGFS" mount "$source" "$mnt" --cache-dir "$WORK/cache-$name" \
    --log-file "$WORK/$name.log" "${store_options[@]}" "$@" || fail "mount of $source failed"
  MOUNTS+=("$mnt")
}

# mount_bucket FOLDER MOUNTPOINT NAME [imgfs options...]: mounts the bucket FOLDER stands for.
mount_bucket() {
  local folder=$1 mnt=$2 name=$3
  shift 3
  mount_source "$(bucket_source "$folder" "$name")" "$mnt" "$name" "$@"
}

# unmount MOUNTPOINT: unmounts, and checks that the daemon then exits (no thread left stuck).
unmount() {
  local pid
  pid=$(pgrep -f -- " $1 --cache-dir" | head -1 || true)
  fusermount3 -u "$1" || fail "unmount of $1 failed"
  [ -n "$pid" ] || return 0
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  fail "the imgfs daemon of $1 (pid $pid) did not exit after the unmount"
}

# stat_field FILE KEY: a top-level number from stats.json.
stat_field() {
  grep -o "\"$2\":[0-9]*" "$1" | head -1 | cut -d: -f2
}

# import_manifest FILE NAME PART_SIZE FORMAT OUT_DIR KEY_FOLDER: an EC2 import of FILE the way
# ec2-import-volume / euca-import-volume lays it out: FILE cut into PART_SIZE byte ranges,
# stored as OUT_DIR/KEY_FOLDER/NAME.part.N, and OUT_DIR/KEY_FOLDER/NAME.manifest.xml naming
# each part by key (relative to the bucket) with inclusive byte ranges.
import_manifest() {
  local file=$1 name=$2 part_size=$3 format=$4 out=$5 folder=$6
  mkdir -p "$out/$folder"
  local size count=0 parts="" start=0
  size=$(stat -c %s "$file")
  while [ "$start" -lt "$size" ]; do
    local end=$((start + part_size - 1))
    [ "$end" -lt "$size" ] || end=$((size - 1))
    dd if="$file" of="$out/$folder/$name.part.$count" bs=1M iflag=skip_bytes,count_bytes \
      skip="$start" count=$((end - start + 1)) status=none
    parts+="<part index=\"$count\"><byte-range start=\"$start\" end=\"$end\"/><key>$folder/$name.part.$count</key>"
    parts+="<head-url>http://unused.invalid/h</head-url><get-url>http://unused.invalid/g</get-url></part>"
    count=$((count + 1))
    start=$((end + 1))
  done
  printf "<?xml version='1.0' encoding='UTF-8' standalone='yes'?>\n<manifest><version>2010-11-15</version><file-format>%s</file-format><importer><name>euca2ools</name><version>3.4.1</version><release>0</release></importer><self-destruct-url>http://unused.invalid/d</self-destruct-url><import><size>%s</size><volume-size>1</volume-size><parts count=\"%s\">%s</parts></import></manifest>" \
    "$format" "$size" "$count" "$parts" >"$out/$folder/$name.manifest.xml"
}
