#!/usr/bin/env bash
# Seeds fuzz/corpus/<target>/ with the golden vectors and refusal fixtures of
# manifest/tests/data (the files the tests check byte for byte), so every fuzz run starts from
# real, signed inputs. Idempotent: rewrites only the golden-* files, keeps what the fuzzer found.
# scripts/fuzz.sh runs it; by hand: fuzz/seed.sh
set -euo pipefail
cd "$(dirname "$0")"
data=../manifest/tests/data
[ -f "$data/manifest" ] || { echo "seed.sh: $data/manifest missing" >&2; exit 1; }
mkdir -p corpus/manifest_parse corpus/signature_verify corpus/enroll_parse corpus/rotation_check \
    corpus/renew_parse

# manifest_parse takes a manifest as is.
cp "$data/manifest" corpus/manifest_parse/golden
for d in "$data"/refuse/*/; do
    cp "$d/manifest" "corpus/manifest_parse/golden-$(basename "$d")"
done

# signature_verify: the first byte B puts the end of the signature text at B * len(rest) / 255
# of the rest, the manifest follows. Blank lines after a signature are ignored by the parser,
# so pad the signature with them until some B splits exactly after it.
pair() { # SIG MANIFEST OUT
    local s m pad cut len b
    s=$(wc -c <"$1")
    m=$(wc -c <"$2")
    for pad in $(seq 0 1000); do
        cut=$((s + pad))
        len=$((cut + m))
        b=$(((cut * 255 + len - 1) / len))
        if [ "$b" -le 255 ] && [ $((b * len / 255)) -eq "$cut" ]; then
            {
                printf "\\$(printf '%03o' "$b")"
                cat "$1"
                head -c "$pad" /dev/zero | tr '\0' '\n'
                cat "$2"
            } >"$3"
            return
        fi
    done
    echo "seed.sh: no split byte for $1" >&2
    exit 1
}
pair "$data/manifest.minisig" "$data/manifest" corpus/signature_verify/golden
for d in "$data"/refuse/*/; do
    pair "$d/manifest.minisig" "$d/manifest" "corpus/signature_verify/golden-$(basename "$d")"
done

# enroll_parse: a request as is; a response without its format line and signature line (the
# target adds both and signs with its own key).
cp "$data/enroll/request" corpus/enroll_parse/golden-request
sed '1d;$d' "$data/enroll/response" >corpus/enroll_parse/golden-response

# rotation_check: a statement as is, and statement + both signatures behind the two bytes that
# cut them apart again (found the same way as for signature_verify: pad with blank lines).
n=0
for d in "$data"/rotate/*/ "$data"/rotate/refuse/*/; do
    [ -f "$d/keys/1" ] || continue
    n=$((n + 1))
    cp "$d/keys/1" "corpus/rotation_check/golden-$n"
    s=$(wc -c <"$d/keys/1")
    o=$(cat "$d/keys/1.minisig" | wc -c)
    w=$({ cat "$d/keys/1.new.minisig" 2>/dev/null || true; } | wc -c)
    len=$((s + o + w))
    a=$(((s * 255 + len - 1) / len)); b=$((((s + o) * 255 + len - 1) / len))
    {
        printf "\\$(printf '%03o' "$a")\\$(printf '%03o' "$b")"
        cat "$d/keys/1" "$d/keys/1.minisig"
        cat "$d/keys/1.new.minisig" 2>/dev/null || true
    } >"corpus/rotation_check/golden-files-$n"
done

# renew_parse: a certificate's DER (the golden one, made by openssl), and a renewal request's
# shape (its signature by no one: the parser, not the signature check, is what runs long).
sed '1d;$d' "$data/enroll/node.crt" | base64 -d >corpus/renew_parse/golden-cert
printf 'idhal-renew-request 1\nnode client3\ntime 1767225600\nnonce %s\nsignature %s\n' \
    00112233445566778899aabbccddeeff "$(head -c 64 /dev/zero | base64 -w0)" \
    >corpus/renew_parse/golden-request

echo "seed.sh: $(ls corpus/manifest_parse/golden* corpus/signature_verify/golden* \
    corpus/enroll_parse/golden* corpus/rotation_check/golden* corpus/renew_parse/golden* \
    | wc -l) seeds from $data"
