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
# The demo page's onnxruntime-web, pinned by web/package-lock.json (`npm ci`), when npm is here;
# again only when the lockfile changed or web/node_modules went missing.
if command -v npm >/dev/null 2>&1; then
    web_stamp="web/node_modules/.edgesam-installed"
    web_want="$(sha256sum web/package-lock.json | cut -d' ' -f1)"
    if [ "$(cat "$web_stamp" 2>/dev/null)" != "$web_want" ]; then
        echo "installing the demo page's onnxruntime-web (npm ci in web/) ..."
        if (cd web && npm ci --no-audit --no-fund --loglevel=error); then
            echo "$web_want" > "$web_stamp"
        else
            echo "npm ci in web/ failed: edgesam demo and the browser test need web/node_modules" >&2
        fi
    fi
else
    echo "npm not found: the demo page (edgesam demo) and its tests need Node.js and npm (apt-get install nodejs npm)" >&2
fi
# The browser test drives Debian's chromium (Playwright's own browsers are not downloaded): installed
# once when missing and this shell may (root, apt-get); a failed try is not retried on every run.
if ! command -v chromium >/dev/null 2>&1 && [ ! -e .venv/.chromium-tried ] && [ "$(id -u)" = 0 ] \
        && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium for the demo page's browser test (apt-get) ..."
    apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
        || (apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends chromium >/dev/null 2>&1) \
        || echo "chromium could not be installed: the browser test (scripts/test.sh -m browser) will skip" >&2
    touch .venv/.chromium-tried
fi
