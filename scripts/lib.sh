# shellcheck shell=bash
# Shared shell functions for scripts/test, scripts/try and scripts/bench:
# install the engine packages, start and stop a PRIVATE dockerd, Podman
# service and registry.
#
# Never touches the machine-wide engine at /var/run/docker.sock: every engine
# started here lives under a temp folder with its own socket, data root and no
# network bridge.
#
# Source it, then:
#   stowage_install_deps
#   T=$(mktemp -d /tmp/stowage-x.XXXX)
#   stowage_start_engine "$T"           # sets STOWAGE_ENGINE_SOCK, STOWAGE_ENGINE_PID
#   stowage_start_registry "$T" "$(stowage_free_port)"   # sets STOWAGE_REGISTRY_ADDR
#   stowage_start_podman "$T/podman"    # sets STOWAGE_PODMAN_SOCK, STOWAGE_PODMAN_PID
#   ...
#   stowage_stop_all

# Pids of what this shell started, so stowage_stop_all ends only those.
STOWAGE_PIDS_ENGINE=()
STOWAGE_PIDS_REGISTRY=()
# Podman services, "PID SOCKET" each: their containers go before they stop.
STOWAGE_PODMANS=()

stowage_log() { printf '==> %s\n' "$*" >&2; }

# Install docker.io, docker-registry, busybox-static, skopeo, apache2-utils, podman,
# catatonit and buildah when any of their commands is missing (CI runs on a fresh
# Debian machine as root).
stowage_install_deps() {
    local missing=()
    command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
    command -v docker >/dev/null 2>&1 || missing+=(docker.io)
    command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
    [ -x /bin/busybox ] || command -v busybox >/dev/null 2>&1 || missing+=(busybox-static)
    command -v skopeo >/dev/null 2>&1 || missing+=(skopeo)
    # systemd-analyze: tests/it/systemd_unit.rs verifies systemd/stowage.service.
    command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
    # htpasswd: bcrypt users for the registry with auth in the credentials tests.
    command -v htpasswd >/dev/null 2>&1 || missing+=(apache2-utils)
    # Podman's service for tests/it/podman_real.rs; catatonit builds its pods'
    # infra image here; buildah makes working containers Podman must see.
    command -v podman >/dev/null 2>&1 || missing+=(podman)
    command -v catatonit >/dev/null 2>&1 || missing+=(catatonit)
    command -v buildah >/dev/null 2>&1 || missing+=(buildah)
    if [ ${#missing[@]} -eq 0 ]; then
        return 0
    fi
    # De-duplicate (docker.io may be listed twice).
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: missing packages ${missing[*]}; run as root or install them" >&2
        return 1
    fi
    stowage_log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
}

# Print a free TCP port on 127.0.0.1.
stowage_free_port() {
    python3 - <<'EOF' 2>/dev/null && return 0
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
EOF
    # Fallback without python: probe random high ports with bash's /dev/tcp.
    local port
    for _ in $(seq 1 100); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    echo "error: no free port found" >&2
    return 1
}

# Wait until "$@" succeeds, up to $1 seconds (polling every 0.2 s).
stowage_wait_for() {
    local secs=$1
    shift
    local tries=$((secs * 5))
    for _ in $(seq 1 "$tries"); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    return 1
}

# Start a private dockerd under DIR. DIR must be short (unix socket paths are
# limited to 108 bytes and containerd's shim sockets live under the exec root).
# Sets STOWAGE_ENGINE_SOCK (unix://DIR/docker.sock) and STOWAGE_ENGINE_PID.
stowage_start_engine() {
    local dir=$1
    mkdir -p "$dir/data" "$dir/exec"
    local sock="$dir/docker.sock"
    stowage_log "starting a private dockerd at unix://$sock"
    # Own containerd namespaces: should dockerd attach to a system containerd
    # (it does when /run/containerd/containerd.sock exists), its containers
    # still never mix with the machine-wide engine's.
    local ns="${dir##*/}"
    ns="stowage-${ns#stowage-}"
    dockerd --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/docker.pid" \
        -H "unix://$sock" --bridge=none --iptables=false \
        --containerd-namespace "$ns" --containerd-plugins-namespace "$ns-plugins" \
        >"$dir/dockerd.log" 2>&1 &
    local pid=$!
    STOWAGE_PIDS_ENGINE+=("$pid")
    if ! stowage_wait_for 30 env DOCKER_HOST="unix://$sock" docker version; then
        echo "error: the private dockerd did not answer within 30 s; log tail:" >&2
        tail -n 30 "$dir/dockerd.log" >&2 || true
        return 1
    fi
    STOWAGE_ENGINE_SOCK="unix://$sock"
    STOWAGE_ENGINE_PID=$pid
    export STOWAGE_ENGINE_SOCK STOWAGE_ENGINE_PID
}

# Start a private registry (CNCF distribution) on 127.0.0.1:PORT storing under
# DIR/registry. Sets STOWAGE_REGISTRY_ADDR (127.0.0.1:PORT) and STOWAGE_REGISTRY_PID.
stowage_start_registry() {
    local dir=$1 port=$2
    mkdir -p "$dir/registry"
    cat >"$dir/registry.yml" <<EOF
version: 0.1
log: { level: warn }
storage: { filesystem: { rootdirectory: $dir/registry }, delete: { enabled: true } }
http: { addr: 127.0.0.1:$port }
EOF
    stowage_log "starting a private registry at 127.0.0.1:$port"
    docker-registry serve "$dir/registry.yml" >"$dir/registry.log" 2>&1 &
    local pid=$!
    STOWAGE_PIDS_REGISTRY+=("$pid")
    if ! stowage_wait_for 30 stowage_http_ok "127.0.0.1:$port" /v2/; then
        echo "error: the private registry did not answer within 30 s; log tail:" >&2
        tail -n 30 "$dir/registry.log" >&2 || true
        return 1
    fi
    STOWAGE_REGISTRY_ADDR="127.0.0.1:$port"
    STOWAGE_REGISTRY_PID=$pid
    export STOWAGE_REGISTRY_ADDR STOWAGE_REGISTRY_PID
}

# Succeed when GET http://HOSTPORT/PATH answers 200, using curl or bash's /dev/tcp.
stowage_http_ok() {
    local hostport=$1 path=$2
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null "http://$hostport$path"
        return
    fi
    local host=${hostport%:*} port=${hostport##*:} status
    exec 3<>"/dev/tcp/$host/$port" || return 1
    printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$hostport" >&3
    read -r _ status _ <&3
    exec 3<&- 3>&-
    [ "$status" = 200 ]
}

# Start a private Podman service under DIR (`podman system service`: the
# Docker API and libpod's on unix://DIR/podman.sock) that shares nothing with
# a machine-wide Podman: its own storage.conf (vfs driver, graphroot and
# runroot under DIR), containers.conf (no network for containers; file locks,
# events and temporary files under DIR, TMPDIR too; cgroupfs), registries.conf (no search
# registries: only what stowage names) and XDG folders. It runs in a mount
# namespace of its own where /var/lib, /run and /var/tmp are folders under
# DIR: Podman keeps its blob-info cache in /var/lib/containers/cache, runc its
# state in /run/runc, netavark its own in /run/containers and image loads
# their staging in /var/tmp, whatever the configuration says. DIR must be short (socket paths). Writes DIR/podman.pid,
# DIR/env (the
# variables tests/it/engine_env.rs reads: the socket, and a buildah wrapper on
# the same storage) and sets STOWAGE_PODMAN_SOCK and STOWAGE_PODMAN_PID.
stowage_start_podman() {
    local dir=$1
    if [ -z "$dir" ]; then
        echo "error: stowage_start_podman needs a folder" >&2
        return 1
    fi
    mkdir -p "$dir/root" "$dir/run" "$dir/tmp" "$dir/xdg" "$dir/ns/var-lib" "$dir/ns/run"
    chmod 700 "$dir/xdg"
    local sock="$dir/podman.sock"
    # Limits this machine allows: Podman asks 1048576 for a root container,
    # which a container host's own limits may refuse.
    local nofile nproc
    nofile=$(ulimit -Hn)
    nproc=$(ulimit -Hu)
    if [ "$nofile" = unlimited ] || [ "$nofile" -gt 4096 ]; then nofile=4096; fi
    if [ "$nproc" = unlimited ] || [ "$nproc" -gt 4096 ]; then nproc=4096; fi
    printf '[storage]\ndriver = "vfs"\nrunroot = "%s"\ngraphroot = "%s"\n' \
        "$dir/run" "$dir/root" >"$dir/storage.conf"
    {
        printf '[containers]\nnetns = "none"\n'
        printf 'default_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]\n' "$nofile" "$nofile" "$nproc" "$nproc"
        printf '[network]\nnetwork_config_dir = "%s"\n' "$dir/networks"
        printf '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
        printf 'events_logfile_path = "%s"\ntmp_dir = "%s"\nlock_type = "file"\n' \
            "$dir/events.log" "$dir/tmp"
        printf 'volume_path = "%s"\nstatic_dir = "%s"\nimage_copy_tmp_dir = "%s"\n' \
            "$dir/volumes" "$dir/root/libpod" "$dir/tmp"
    } >"$dir/containers.conf"
    printf 'unqualified-search-registries = []\n' >"$dir/registries.conf"
    local env_vars=(
        "CONTAINERS_STORAGE_CONF=$dir/storage.conf"
        "CONTAINERS_CONF=$dir/containers.conf"
        "CONTAINERS_REGISTRIES_CONF=$dir/registries.conf"
        "XDG_RUNTIME_DIR=$dir/xdg" "XDG_CONFIG_HOME=$dir/config" "XDG_DATA_HOME=$dir/data"
        # Loads and pushes stage files in TMPDIR (else /var/tmp).
        "TMPDIR=$dir/tmp"
    )
    stowage_log "starting a private Podman service at unix://$sock"
    # LIBMOUNT_UTAB: libmount's lock and table under DIR, not in the host's
    # /run/mount.
    # shellcheck disable=SC2016 # expanded by the inner shell
    env "${env_vars[@]}" LIBMOUNT_UTAB="$dir/ns/utab" unshare --mount --propagation private -- sh -c '
        mount -n --bind "$1/ns/var-lib" /var/lib && mount -n --bind "$1/ns/run" /run &&
        mount -n --bind "$1/tmp" /var/tmp &&
        exec podman system service --time=0 "unix://$1/podman.sock"' sh "$dir" \
        >"$dir/podman.log" 2>&1 &
    local pid=$!
    echo "$pid" >"$dir/podman.pid"
    STOWAGE_PODMANS+=("$pid $sock")
    if ! stowage_wait_for 30 podman --remote --url "unix://$sock" version; then
        echo "error: the private Podman service did not answer within 30 s; log tail:" >&2
        tail -n 30 "$dir/podman.log" >&2 || true
        return 1
    fi
    # Buildah on the same storage, inside the service's mount namespace.
    {
        printf '#!/bin/sh\n'
        printf 'exec env'
        printf ' %q' "${env_vars[@]}"
        printf ' nsenter --target %s --mount buildah "$@"\n' "$pid"
    } >"$dir/buildah"
    chmod +x "$dir/buildah"
    {
        printf 'export STOWAGE_TEST_PODMAN=%q\n' "unix://$sock"
        printf 'export STOWAGE_TEST_BUILDAH=%q\n' "$dir/buildah"
    } >"$dir/env"
    STOWAGE_PODMAN_SOCK="unix://$sock"
    STOWAGE_PODMAN_PID=$pid
    export STOWAGE_PODMAN_SOCK STOWAGE_PODMAN_PID
}

# Stop a Podman service stowage_start_podman started: its pods and
# containers first (their conmon processes are not its children), then it.
stowage_stop_podman() {
    local pid=$1 sock=$2
    if kill -0 "$pid" 2>/dev/null; then
        podman --remote --url "unix://$sock" pod rm --all --force --time 0 >/dev/null 2>&1 || true
        podman --remote --url "unix://$sock" rm --all --force --time 0 >/dev/null 2>&1 || true
    fi
    stowage_stop_pid "$pid"
}

# Kill PID and wait (up to ~20 s) for it to exit; SIGKILL after that.
stowage_stop_pid() {
    local pid=$1
    kill -0 "$pid" 2>/dev/null || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.2
    done
    echo "warning: pid $pid did not stop; sending SIGKILL" >&2
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# Stop every registry, engine and Podman service this shell started (registries first, so an
# engine never waits on a registry that is going away).
stowage_stop_all() {
    local pid
    for pid in "${STOWAGE_PIDS_REGISTRY[@]}"; do
        stowage_stop_pid "$pid"
    done
    for pid in "${STOWAGE_PIDS_ENGINE[@]}"; do
        stowage_stop_pid "$pid"
    done
    local podman
    for podman in "${STOWAGE_PODMANS[@]}"; do
        # shellcheck disable=SC2086 # "PID SOCKET": two words
        stowage_stop_podman $podman
    done
    STOWAGE_PIDS_REGISTRY=()
    STOWAGE_PIDS_ENGINE=()
    STOWAGE_PODMANS=()
}
