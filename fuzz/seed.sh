#!/usr/bin/env bash
# Seeds fuzz/corpus/<target>/ with the golden vectors and refusal fixtures of
# manifest/tests/data (the files the tests check byte for byte), so every fuzz run starts from
# real, signed inputs. Idempotent: rewrites only the golden-* files, keeps what the fuzzer found.
# scripts/fuzz.sh runs it; by hand: fuzz/seed.sh
set -euo pipefail
cd "$(dirname "$0")"
data=../manifest/tests/data
[ -f "$data/manifest" ] || { echo "seed.sh: $data/manifest missing" >&2; exit 1; }
mkdir -p corpus/manifest_parse corpus/signature_verify corpus/enroll_parse

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

echo "seed.sh: $(ls corpus/manifest_parse/golden* corpus/signature_verify/golden* \
    corpus/enroll_parse/golden* | wc -l) seeds from $data"
