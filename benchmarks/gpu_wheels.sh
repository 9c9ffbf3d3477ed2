#!/usr/bin/env bash
# Fetch the pure-Python wheels that the GPU box lacks into .whl/ (git-ignored), for Python 3.12.
#
# The box (see benchmarks/README.md, "GPU check") has torch, transformers, tokenizers, pandas,
# pyarrow, fsspec, xxhash, huggingface-hub, pyyaml, tqdm and numpy, but not `datasets`, which
# llmtune imports, nor the two packages datasets needs beyond those (its Requires-Dist):
# dill and multiprocess. It has no network, so the wheels travel with the working tree.
# Versions are this environment's, so the box runs what the test suite runs here.
#
#   bash benchmarks/gpu_wheels.sh          # from the repository root
#
# The box then installs them with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

version() { python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl \
    "datasets==$(version datasets)" "dill==$(version dill)" "multiprocess==$(version multiprocess)"

# Anything datasets requires that neither the box nor .whl/ holds would fail its import there.
box="accelerate botorch cupy huggingface-hub numpy pandas pyarrow fsspec xxhash requests httpx tqdm pyyaml
filelock packaging safetensors tokenizers transformers torch peft onnx onnxruntime scikit-learn scipy psutil pytest"
for wheel in .whl/datasets-*.whl; do
    unzip -p "$wheel" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' |
        sed -E 's/^Requires-Dist: *([A-Za-z0-9_.-]+).*/\1/' | tr 'A-Z_' 'a-z-' |
        while read -r need; do
            if ! grep -qw -- "$need" <<<"$box" && ! ls .whl | tr 'A-Z_' 'a-z-' | grep -q "^$need-"; then
                echo "warning: datasets requires $need, which the box may lack" >&2
            fi
        done
done

ls -l .whl
du -ch .whl/*.whl | tail -1
