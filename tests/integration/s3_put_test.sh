#!/usr/bin/env bash
# S3 writes: ObjectStore::put (what --publish-index uploads with) against s3rver. s3rver is
# started here and the remote unit tests' S3rverTest put case, skipped without an endpoint,
# runs against it: PUTs signed with SigV4 (the body's SHA-256 signed), SigV2 and unsigned, of
# 0 B to 3 MiB under keys with spaces and plus signs, read back byte for byte and replaced by a
# second PUT; a SigV2 PUT signed with a wrong secret is refused with 403 (s3rver does not check
# SigV4 signatures).
# The unit-test binary is found beside the imgfs binary's build tree (tests/remote_unit_tests),
# or named by IMGFS_REMOTE_UNIT_TESTS.
export IMGFS_TEST_STORE=${IMGFS_TEST_STORE:-s3}
source "$(dirname "$0")/lib.sh"

TESTS=${IMGFS_REMOTE_UNIT_TESTS:-$(dirname "$(dirname "$IMGFS")")/tests/remote_unit_tests}
[ -x "$TESTS" ] || fail "no remote_unit_tests at $TESTS: build that target or set IMGFS_REMOTE_UNIT_TESTS"
curl -sf -X PUT "$S3_ENDPOINT/put-test" >/dev/null || fail "cannot create bucket put-test"

CASE=S3rverTest.PutAndReadBackWithEachSigning
if ! IMGFS_S3_ENDPOINT=$S3_ENDPOINT IMGFS_S3_BUCKET=put-test \
  "$TESTS" --gtest_filter="$CASE" >"$WORK/put.log" 2>&1; then
  fail "$CASE failed: $(tail -40 "$WORK/put.log")"
fi
grep -q "^\[       OK \] $CASE" "$WORK/put.log" || fail "$CASE did not run: $(cat "$WORK/put.log")"
pass "put with SigV4, SigV2 and unsigned reads back byte for byte; a wrong SigV2 secret gets 403"

# What the store wrote is an ordinary object to any other client.
size=$(curl -sfI "$S3_ENDPOINT/put-test/put-test/v4/a%20b%2Bc%2065537.imgfs-index" |
  tr -d '\r' | sed -n 's/^[Cc]ontent-[Ll]ength: //p')
[ "$size" = 65544 ] || fail "object written by put has size '$size' for curl, not 65544"
pass "objects written by put are served to other clients"
