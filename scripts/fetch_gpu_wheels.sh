#!/usr/bin/env bash
# Downloads the wheels that the GPU machines lack (Python 3.12, manylinux x86_64) into .whl/ (git-ignored), so that
# scripts/gpu_check.sh can install them there without network. Run here, where PyPI is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
pip_download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$@"
}
pip_download tensorflow-datasets==4.9.10 array-record==0.8.6 grain==0.2.18 dm-tree==0.1.10 simple-parsing==0.1.9 \
  clu==0.0.12 tensorboardX==2.6.5 ml-collections==1.1.0 tensorflow-metadata==1.21.0 docstring-parser==0.18.0 \
  portpicker==1.6.0 toml==0.10.2 termcolor==3.3.0 immutabledict==4.3.1 protobuf==6.33.5 etils==1.15.0 \
  flatbuffers==25.12.19  # jax.export serialization (the portable leader of --mode export).
# promise 2.3 publishes no wheel: build one.
[ -n "$(ls .whl/promise-2.3-*.whl 2>/dev/null)" ] || python3 -m pip wheel -q --no-deps -w .whl promise==2.3
ls -la .whl
du -sh .whl
