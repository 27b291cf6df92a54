#!/usr/bin/env bash
# Prints the path of a working CPython 3.12 (megatron-core >= 0.17 needs it), or fails. A pyenv
# shim named python3.12 may exist without working, so each candidate is actually run.
for candidate in "${PYTHON:-}" "$(command -v python3.12 2>/dev/null)" \
                 $(ls -d "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 2>/dev/null); do
  if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    echo "$candidate"
    exit 0
  fi
done
echo "no working Python 3.12 found (set PYTHON=/path/to/python3.12)" >&2
exit 1
