# Sourced by the demo scripts (demo.sh, demo_freetext.sh): the repository as the working folder, its Python, the
# demo's logs, and the same CPU kernels and thread count on every x86-64 machine with AVX2, so that a rerun elsewhere
# writes the same numbers (README, Reproducibility); each run records what it used in its environment.json. Set any
# of these variables to override.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
export ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2} ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2}
export MKL_CBWR=${MKL_CBWR:-AVX2} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
LOGS=${LOGS:-logs/demo}
