# Source me: create .venv on a fresh checkout (torch first, then the project) and activate it.
# Reinstalls only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv ..."
    python3 -m venv .venv
fi
. .venv/bin/activate
stamp=".venv/.edgesam-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "installing torch, torchvision and edgesam[dev] into .venv ..."
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
    python -m pip install --quiet -e ".[dev]"
    echo "$want" > "$stamp"
fi
