#!/usr/bin/env bash
# Provision the nlpfleet data plane: one image for both roles (inference server + instance agent,
# or job runner), the role chosen at boot from user data by nlpfleet-boot.
#
# On the Packer build instance (root, no DESTDIR) it also installs OS packages, the CloudWatch
# agent and the service user. With DESTDIR it installs into that throwaway root instead (what
# the tests do on a developer machine):
#
#   DESTDIR=/tmp/root NLPFLEET_VARIANT=cpu NLPFLEET_PYTHON=.venv/bin/python \
#   NLPFLEET_BASE_SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
#   NLPFLEET_WHEEL=dist/nlpfleet-0.1.0-py3-none-any.whl NLPFLEET_CONSTRAINTS=constraints.txt \
#   ami/scripts/provision.sh
#
# Settings (environment):
#   NLPFLEET_VARIANT      gpu (onnxruntime-gpu, TensorRT/CUDA providers) | cpu (onnxruntime)
#   NLPFLEET_SRC          the ami/ folder (scripts/, files/, dist/); default: beside this script
#   NLPFLEET_WHEEL        the project wheel; default: the one nlpfleet-*.whl in $NLPFLEET_SRC/dist
#   NLPFLEET_CONSTRAINTS  pinned versions; default: $NLPFLEET_SRC/dist/constraints.txt
#   NLPFLEET_PYTHON       interpreter for the venv (default python3)
#   NLPFLEET_BASE_SITE    offline install: layer the venv over this site-packages and install with
#                         --no-index, so every pin is checked against packages already on disk
#   NLPFLEET_PIP_ARGS     extra pip arguments (an internal index, a torch CPU index, ...)
#   NLPFLEET_TENSORRT     pip requirement for TensorRT libraries on gpu images (default: none,
#                         the base image's TensorRT, if any, is used; CUDA is the fallback)
#   NLPFLEET_OS_PACKAGES  1/0: install OS packages, CloudWatch agent, service user
#                         (default 1 without DESTDIR, 0 with it)
#   NLPFLEET_IMAGE_NAME   recorded in /etc/nlpfleet/image.env
set -euo pipefail

VARIANT="${NLPFLEET_VARIANT:-gpu}"
SRC="${NLPFLEET_SRC:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
DESTDIR="${DESTDIR:-}"
WHEEL="${NLPFLEET_WHEEL:-}"
CONSTRAINTS="${NLPFLEET_CONSTRAINTS:-$SRC/dist/constraints.txt}"
PYTHON="${NLPFLEET_PYTHON:-python3}"
BASE_SITE="${NLPFLEET_BASE_SITE:-}"
TENSORRT="${NLPFLEET_TENSORRT:-}"
IMAGE_NAME="${NLPFLEET_IMAGE_NAME:-nlpfleet-${VARIANT}-dev}"
if [[ -n "$DESTDIR" ]]; then OS_PACKAGES="${NLPFLEET_OS_PACKAGES:-0}"; else OS_PACKAGES="${NLPFLEET_OS_PACKAGES:-1}"; fi
read -r -a PIP_ARGS <<<"${NLPFLEET_PIP_ARGS:-}"

# Installed paths (what the systemd units name); DESTDIR only prefixes where files are written.
PREFIX=/opt/nlpfleet
VENV=$PREFIX/venv
STATE=/var/lib/nlpfleet
TRT_CACHE=$STATE/trt-cache
LOGS=/var/log/nlpfleet
CWA_CONFIG=$PREFIX/share/cloudwatch-agent.json
CWA_DEB_URL=https://amazoncloudwatch-agent.s3.amazonaws.com/ubuntu/amd64/latest/amazon-cloudwatch-agent.deb

log() { printf 'provision: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

case "$VARIANT" in
  gpu) EXTRAS="gpu,training" ;;
  cpu) EXTRAS="serving,training" ;;
  *) die "NLPFLEET_VARIANT must be gpu or cpu, got '$VARIANT'" ;;
esac

if [[ -z "$WHEEL" ]]; then
  shopt -s nullglob
  wheels=("$SRC"/dist/nlpfleet-*.whl)
  shopt -u nullglob
  [[ ${#wheels[@]} -eq 1 ]] || die "expected one nlpfleet wheel in $SRC/dist, found ${#wheels[@]}"
  WHEEL="${wheels[0]}"
fi
[[ -f "$WHEEL" ]] || die "no wheel at $WHEEL"
[[ -f "$CONSTRAINTS" ]] || die "no constraints file at $CONSTRAINTS"

install_os_packages() {
  log "OS packages, CloudWatch agent, service user"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends python3 python3-venv python3-pip python3-dev curl ca-certificates
  local deb
  deb="$(mktemp --suffix=.deb)"
  curl -fsSL --retry 5 -o "$deb" "$CWA_DEB_URL"
  dpkg -i -E "$deb"
  rm -f "$deb"
  id -u nlpfleet >/dev/null 2>&1 ||
    useradd --system --home-dir "$STATE" --shell /usr/sbin/nologin nlpfleet
}

layout() {
  log "layout under ${DESTDIR:-/}"
  install -d -m 0755 "$DESTDIR$PREFIX/bin" "$DESTDIR$PREFIX/share" "$DESTDIR/etc/nlpfleet" \
    "$DESTDIR/etc/systemd/system/multi-user.target.wants"
  # State and logs live on the root EBS volume: the TensorRT engine cache survives reboots and
  # service restarts (engines take minutes to build), models are fetched here, jobs work in
  # scratch/ (datasets, checkpoints: not /tmp).
  install -d -m 0750 "$DESTDIR$STATE" "$DESTDIR$STATE/models" "$DESTDIR$STATE/scratch" "$DESTDIR$TRT_CACHE"
  install -d -m 0755 "$DESTDIR$LOGS"
  if [[ "$OS_PACKAGES" == 1 ]]; then
    chown -R nlpfleet:nlpfleet "$DESTDIR$STATE" "$DESTDIR$LOGS"
  fi
}

python_env() {
  local venv="$DESTDIR$VENV" constraints="$DESTDIR$PREFIX/share/constraints.txt"
  log "venv $VENV ($VARIANT: extras $EXTRAS)"
  "$PYTHON" -m venv "$venv"
  cp "$CONSTRAINTS" "$constraints"
  # onnxruntime-gpu is onnxruntime's twin: pin it to the same version.
  local ort_version
  ort_version="$(sed -n 's/^onnxruntime==\([^[:space:]]*\).*/\1/p' "$constraints")"
  [[ -n "$ort_version" ]] || die "constraints pin no onnxruntime version"
  grep -q '^onnxruntime-gpu==' "$constraints" || echo "onnxruntime-gpu==$ort_version" >>"$constraints"

  local pip=("$venv/bin/python" -m pip --disable-pip-version-check)
  local args=("${PIP_ARGS[@]}")
  if [[ -n "$BASE_SITE" ]]; then
    # Offline: every dependency must already be on disk at its pinned version.
    local site
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$BASE_SITE" >"$site/_nlpfleet_base_site.pth"
    # The venv's bundled setuptools would shadow the base's (and fail its pins): use the base's.
    "${pip[@]}" uninstall -q -y setuptools 2>/dev/null || true
    args+=(--no-index)
  fi
  "${pip[@]}" install -q "${args[@]}" -c "$constraints" "${WHEEL}[${EXTRAS}]"

  if [[ "$VARIANT" == gpu ]]; then
    # training pulls onnxruntime (CPU) for the export; both wheels own the same module, so the
    # GPU build is put back over it, with the CUDA/cuDNN runtime wheels it was built against.
    "${pip[@]}" uninstall -q -y onnxruntime
    "${pip[@]}" install -q "${args[@]}" --force-reinstall --no-deps -c "$constraints" onnxruntime-gpu
    "${pip[@]}" install -q "${args[@]}" -c "$constraints" "onnxruntime-gpu[cuda,cudnn]"
    if [[ -n "$TENSORRT" ]]; then
      "${pip[@]}" install -q "${args[@]}" -c "$constraints" "$TENSORRT"
    fi
  fi
}

install_files() {
  log "boot script, systemd units, CloudWatch agent configuration"
  # nlpfleet-boot runs with the image's venv (it needs boto3 for the active-model parameter).
  { echo "#!$VENV/bin/python"; tail -n +2 "$SRC/files/nlpfleet-boot.py"; } >"$DESTDIR$PREFIX/bin/nlpfleet-boot"
  chmod 0755 "$DESTDIR$PREFIX/bin/nlpfleet-boot"
  install -m 0644 "$SRC"/files/systemd/nlpfleet-*.service "$DESTDIR/etc/systemd/system/"
  # `systemctl enable` without a running systemd (works under DESTDIR too).
  ln -sf /etc/systemd/system/nlpfleet-boot.service \
    "$DESTDIR/etc/systemd/system/multi-user.target.wants/nlpfleet-boot.service"

  local cwa_cmd=(cp "$SRC/files/cloudwatch-agent.json" "$DESTDIR$CWA_CONFIG")
  if [[ "$VARIANT" == gpu ]]; then
    # GPU utilisation and memory next to the host metrics (the agent reads nvidia-smi).
    cwa_cmd=("$DESTDIR$VENV/bin/python" -c '
import json, sys
doc = json.load(open(sys.argv[1]))
doc["metrics"]["metrics_collected"]["nvidia_gpu"] = {
    "measurement": ["utilization_gpu", "memory_used", "memory_total", "temperature_gpu"]}
json.dump(doc, open(sys.argv[2], "w"), indent=2)
' "$SRC/files/cloudwatch-agent.json" "$DESTDIR$CWA_CONFIG")
  fi
  "${cwa_cmd[@]}"

  # NLPFLEET_* keys double as the inference server's settings (inference/serve_settings.py):
  # the model and TensorRT engine caches live on the root EBS volume. The server picks its
  # execution providers from the hardware (TensorRT -> CUDA -> CPU).
  cat >"$DESTDIR/etc/nlpfleet/image.env" <<EOF
# Written at image build time; per-instance settings are in /run/nlpfleet/nlpfleet.env.
NLPFLEET_IMAGE_NAME=$IMAGE_NAME
NLPFLEET_IMAGE_VARIANT=$VARIANT
NLPFLEET_TRT_CACHE_DIR=$TRT_CACHE
NLPFLEET_MODEL_CACHE_DIR=$STATE/models
NLPFLEET_SCRATCH=$STATE/scratch
HOME=$STATE
HF_HUB_OFFLINE=1
TRANSFORMERS_OFFLINE=1
PYTHONUNBUFFERED=1
EOF
}

[[ "$OS_PACKAGES" == 1 ]] && install_os_packages
layout
python_env
install_files
log "smoke check"
"$DESTDIR$VENV/bin/python" "$SRC/scripts/smoke.py" --variant "$VARIANT"
log "done: $IMAGE_NAME"
