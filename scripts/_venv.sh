# Sourced by the scripts: make sure .venv exists with slim, its dev extras and the example
# plugin installed. torch is pinned by constraints.txt to the CPU wheel (a plain `torch`
# would pull a multi-GB CUDA build); pyproject.toml keeps torch>=2.3 for users.
if [ ! -x .venv/bin/slim ] || [ pyproject.toml -nt .venv/.slim-installed ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
  .venv/bin/python -m pip install -q -c constraints.txt -e plugins/slim-plugin-example
  touch .venv/.slim-installed
fi
