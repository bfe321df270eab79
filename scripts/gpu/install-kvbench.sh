# Sourced by scripts/gpu/qwen.sh and scripts/gpu/gpu-setup.sh (needs $root, the repository root).
# once per machine: a second install while another call's lanes run rewrites the `kvbench` script under them (on
# 2026-12-03 a sweep lane started beside `train-kvcar` found no `kvbench` and ran nothing)
install_kvbench() {
  command -v kvbench >/dev/null && python3 -c "import kvbench, sys; sys.exit(not kvbench.__file__.startswith('$root/'))" 2>/dev/null \
    || python3 -m pip install -q --no-deps --no-build-isolation -e "$root" 2>&1 | grep -v WARNING; }
