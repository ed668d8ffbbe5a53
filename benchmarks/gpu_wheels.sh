#!/usr/bin/env bash
# The wheels gpu_e2e.sh brings to a GPU machine that has torch but no network: made here (with
# network), in two folders of at most 64 MiB each, one per call of the device tool.
#
#   bash benchmarks/gpu_wheels.sh 3.12      # the GPU machine's Python (gpu_check.sh prints it)
#
# build/wheels-1  SimpleITK, and nilearn without its dependencies: the phantoms read only the MNI
#                 template files nilearn ships, never import it
# build/wheels-2  MLflow's client and SQLite store (mlflow-skinny, SQLAlchemy, Alembic) and
#                 nibabel, with their dependencies, minus what the machine has already ($HAVE,
#                 names as in wheel files; default: torch's own dependencies)
# Then, for each folder in turn, copy it to build/wheels and call (benchmarks/README.md):
#   run(command="bash benchmarks/gpu_e2e.sh install", carry=["build/wheels"])   # wheels-1
#   run(command="bash benchmarks/gpu_e2e.sh", carry=["build/wheels"])           # wheels-2, and the run
# `gpu_e2e.sh install` prints the packages still missing there (numpy, scipy, pandas, matplotlib,
# tqdm are assumed present; add any it names to wheels-2).
set -euo pipefail
pyver=${1:?usage: gpu_wheels.sh PYTHON_VERSION (of the GPU machine, e.g. 3.12)}
py=${PYTHON:-python3}
mlflow_version=$($py -c 'import mlflow; print(mlflow.__version__)' 2>/dev/null || echo 3.17.2)
have=${HAVE:-"torch numpy typing_extensions filelock jinja2 MarkupSafe fsspec sympy mpmath networkx setuptools triton nvidia_*"}
platform=(--only-binary=:all: --implementation cp --python-version "$pyver"
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
cd "$(dirname "$0")/.."
rm -rf build/wheels-1 build/wheels-2
$py -m pip download --quiet "${platform[@]}" --no-deps -d build/wheels-1 "SimpleITK>=2.3,<3" "nilearn>=0.10,<1"
$py -m pip download --quiet "${platform[@]}" -d build/wheels-2 "mlflow-skinny==$mlflow_version" "sqlalchemy>=2" alembic "nibabel>=5,<6"
for name in $have; do rm -f build/wheels-2/${name}-*.whl; done
for dir in build/wheels-1 build/wheels-2; do
  size=$(du -sm "$dir" | cut -f1)
  echo "$dir: $(ls "$dir" | wc -l) wheels, $size MiB"
  [ "$size" -le 64 ] || { echo "$dir is over 64 MiB: move wheels to the other folder" >&2; exit 1; }
done
