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
#   stowage_start_engine "$T"           # sets STOWAGE_ENGINE_SOCK, STOWAGE_ENGINE_PID,
#                                       # STOWAGE_ENGINE_TLS_ADDR, STOWAGE_ENGINE_TLS_CERTS
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

# Whether this runs in CI (as tests/it/engine_env.rs reads CI): a skip there is a failure.
stowage_in_ci() {
    case "${CI:-}" in
    "" | false | 0) return 1 ;;
    *) return 0 ;;
    esac
}

# Install docker.io, docker-registry, busybox-static, skopeo, systemd, apache2-utils,
# dpkg-dev, groff-base, man-db, podman, catatonit and buildah when any of their commands is missing (CI
# runs on a fresh Debian machine as root).
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
    # openssl: the private engine's TLS certificates (stowage_make_certs);
    # ip: the network namespace of tests/it/engine_tls.rs.
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    command -v ip >/dev/null 2>&1 || missing+=(iproute2)
    # The .deb (scripts/package, the package phase of scripts/test): cargo-deb
    # computes Depends with dpkg-shlibdeps; tests/it/package.rs renders the
    # man pages with groff; the installed package is checked with man -w.
    command -v dpkg-shlibdeps >/dev/null 2>&1 || missing+=(dpkg-dev)
    command -v groff >/dev/null 2>&1 || missing+=(groff-base)
    command -v man >/dev/null 2>&1 || missing+=(man-db)
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

# _stowage_cert EXT KEY CERT CN [CA CAKEY]: a new P-256 key and its
# certificate with the extensions of section EXT of $STOWAGE_CERT_EXT, signed
# by CA (self-signed without one), valid 30 days.
_stowage_cert() {
    local ext=$1 key=$2 cert=$3 cn=$4 ca=${5:-} cakey=${6:-}
    local sign=(-signkey "$key")
    [ -n "$ca" ] && sign=(-CA "$ca" -CAkey "$cakey" -set_serial "0x$(openssl rand -hex 8)")
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -subj "/CN=$cn" -keyout "$key" -out "$cert.csr" 2>/dev/null &&
        openssl x509 -req -in "$cert.csr" "${sign[@]}" -days 30 \
            -extfile "$STOWAGE_CERT_EXT" -extensions "$ext" -out "$cert" 2>/dev/null &&
        rm -f "$cert.csr"
}

# Make a test PKI under DIR with openssl: a CA (ca.pem), the engine's
# certificate for 127.0.0.1 and localhost (server-cert.pem, server-key.pem),
# DIR/client with ca.pem, cert.pem and key.pem as DOCKER_CERT_PATH holds them,
# and DIR/other: a second CA and a client certificate of its own, which the
# engine does not trust.
stowage_make_certs() {
    local d=$1
    mkdir -p "$d/client" "$d/other"
    STOWAGE_CERT_EXT="$d/ext.cnf"
    cat >"$STOWAGE_CERT_EXT" <<'EOF'
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
EOF
    _stowage_cert ca "$d/ca-key.pem" "$d/ca.pem" "stowage test CA" &&
        _stowage_cert server "$d/server-key.pem" "$d/server-cert.pem" 127.0.0.1 \
            "$d/ca.pem" "$d/ca-key.pem" &&
        _stowage_cert client "$d/client/key.pem" "$d/client/cert.pem" "stowage test client" \
            "$d/ca.pem" "$d/ca-key.pem" &&
        cp "$d/ca.pem" "$d/client/ca.pem" &&
        _stowage_cert ca "$d/other/ca-key.pem" "$d/other/ca.pem" "another CA" &&
        _stowage_cert client "$d/other/key.pem" "$d/other/cert.pem" "another client" \
            "$d/other/ca.pem" "$d/other/ca-key.pem"
}

# Start a private dockerd under DIR. DIR must be short (unix socket paths are
# limited to 108 bytes and containerd's shim sockets live under the exec root).
# Besides its unix socket it listens on tcp://127.0.0.1:PORT with TLS, client
# certificates required (`--tlsverify`), certificates from stowage_make_certs
# under DIR/tls. Sets STOWAGE_ENGINE_SOCK (unix://DIR/docker.sock),
# STOWAGE_ENGINE_PID, STOWAGE_ENGINE_TLS_ADDR (tcp://127.0.0.1:PORT) and
# STOWAGE_ENGINE_TLS_CERTS (DIR/tls).
stowage_start_engine() {
    local dir=$1
    mkdir -p "$dir/data" "$dir/exec"
    local sock="$dir/docker.sock"
    if ! stowage_make_certs "$dir/tls"; then
        echo "error: making the engine's TLS certificates with openssl failed" >&2
        return 1
    fi
    local tls_port
    tls_port=$(stowage_free_port) || return 1
    stowage_log "starting a private dockerd at unix://$sock and tcp://127.0.0.1:$tls_port (TLS)"
    # Own containerd namespaces: should dockerd attach to a system containerd
    # (it does when /run/containerd/containerd.sock exists), its containers
    # still never mix with the machine-wide engine's.
    local ns="${dir##*/}"
    ns="stowage-${ns#stowage-}"
    dockerd --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/docker.pid" \
        -H "unix://$sock" --bridge=none --iptables=false \
        -H "tcp://127.0.0.1:$tls_port" --tlsverify --tlscacert "$dir/tls/ca.pem" \
        --tlscert "$dir/tls/server-cert.pem" --tlskey "$dir/tls/server-key.pem" \
        --containerd-namespace "$ns" --containerd-plugins-namespace "$ns-plugins" \
        >"$dir/dockerd.log" 2>&1 &
    local pid=$!
    STOWAGE_PIDS_ENGINE+=("$pid")
    if ! stowage_wait_for 30 env DOCKER_HOST="unix://$sock" docker version; then
        echo "error: the private dockerd did not answer within 30 s; log tail:" >&2
        tail -n 30 "$dir/dockerd.log" >&2 || true
        return 1
    fi
    if ! stowage_wait_for 10 docker --host "tcp://127.0.0.1:$tls_port" --tlsverify \
        --tlscacert "$dir/tls/client/ca.pem" --tlscert "$dir/tls/client/cert.pem" \
        --tlskey "$dir/tls/client/key.pem" version; then
        echo "error: the private dockerd does not answer over TLS at 127.0.0.1:$tls_port; log tail:" >&2
        tail -n 30 "$dir/dockerd.log" >&2 || true
        return 1
    fi
    STOWAGE_ENGINE_SOCK="unix://$sock"
    STOWAGE_ENGINE_PID=$pid
    STOWAGE_ENGINE_TLS_ADDR="tcp://127.0.0.1:$tls_port"
    STOWAGE_ENGINE_TLS_CERTS="$dir/tls"
    export STOWAGE_ENGINE_SOCK STOWAGE_ENGINE_PID STOWAGE_ENGINE_TLS_ADDR STOWAGE_ENGINE_TLS_CERTS
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
        # runc, not Debian's default crun: crun refuses a host with hybrid
        # cgroups (v1 controllers beside /sys/fs/cgroup/unified), which
        # some CI machines have; runc (docker.io's own runtime) runs on both.
        printf '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
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

# dpkg with its arguments, waiting up to 2 min for a dpkg or apt of someone
# else to release the lock instead of failing on it.
stowage_dpkg() {
    local out rc
    for _ in $(seq 1 60); do
        rc=0
        out=$(dpkg "$@" 2>&1) || rc=$?
        if [ "$rc" -ne 0 ] && grep -q "lock" <<<"$out"; then
            sleep 2
            continue
        fi
        printf '%s\n' "$out"
        return "$rc"
    done
    printf '%s\n' "$out"
    return 1
}

# Paths an installed stowage owns; a host with any of them is not touched.
STOWAGE_PACKAGE_PATHS=(/usr/bin/stowage /etc/stowage /var/lib/stowage
    /usr/lib/systemd/system/stowage.service /lib/systemd/system/stowage.service
    /etc/systemd/system/stowage.service)

# Install the .deb DEB, check what a user gets, purge it and check it is gone.
# Needs root and a host without stowage (its purge removes /etc/stowage and
# /var/lib/stowage): returns 2 without touching anything otherwise. Sets
# STOWAGE_PACKAGE_INSTALLED=1 while installed, for a trap to purge.
stowage_check_package() {
    local deb=$1 p
    if [ "$(id -u)" -ne 0 ]; then
        echo "the package check needs root (dpkg -i)" >&2
        return 2
    fi
    if dpkg-query -W -f='${Status}' stowage 2>/dev/null | grep -q installed; then
        echo "stowage is already installed as a package here; not replacing it" >&2
        return 2
    fi
    for p in "${STOWAGE_PACKAGE_PATHS[@]}"; do
        if [ -e "$p" ]; then
            echo "$p exists (a stowage installed from source?); not installing over it" >&2
            return 2
        fi
    done
    local version
    version=$(dpkg-deb -f "$deb" Version)
    stowage_log "dpkg -i $deb"
    STOWAGE_PACKAGE_INSTALLED=1
    stowage_dpkg -i "$deb" || return 1
    (
        set -euo pipefail
        fail() { echo "package check: $*" >&2; exit 1; }
        [ "$(dpkg-query -W -f='${Status}' stowage)" = "install ok installed" ] || fail "not installed"
        [ "$(command -v stowage)" = /usr/bin/stowage ] || fail "stowage is not /usr/bin/stowage"
        out=$(stowage --version)
        [ "$out" = "stowage ${version%-*}" ] || fail "stowage --version: $out (package $version)"
        out=$(stowage check -p /etc/stowage/policy.toml) || fail "stowage check of the installed policy failed"
        echo "$out"
        grep -q "dry_run" <<<"$out" || fail "the installed policy is not a dry run"
        # The default policy path is the installed one.
        stowage check >/dev/null || fail "stowage check (default -p) failed"
        dpkg-query -W -f='${Conffiles}\n' stowage | grep -q '^ /etc/stowage/policy.toml ' ||
            fail "/etc/stowage/policy.toml is not a conffile"
        [ "$(stat -c %a /var/lib/stowage)" = 700 ] || fail "/var/lib/stowage missing or not 0700"
        [ -f /lib/systemd/system/stowage.service ] || fail "no /lib/systemd/system/stowage.service"
        grep -qx 'ExecStart=/usr/bin/stowage run --policy /etc/stowage/policy.toml' \
            /lib/systemd/system/stowage.service || fail "the unit does not start /usr/bin/stowage"
        # Installing must not enable or start the service.
        [ ! -e /etc/systemd/system/multi-user.target.wants/stowage.service ] || fail "the unit was enabled"
        if [ -d /run/systemd/system ]; then
            ! systemctl is-active --quiet stowage || fail "the service was started"
        fi
        [ "$(man -w stowage)" = /usr/share/man/man1/stowage.1.gz ] || fail "man -w stowage: $(man -w stowage 2>&1)"
        man -w stowage-bundle-create >/dev/null || fail "no man page stowage-bundle-create"
        MANWIDTH=80 man stowage 2>/dev/null | grep -q "EXIT STATUS" || fail "man stowage does not render"
        for f in /usr/share/bash-completion/completions/stowage \
            /usr/share/zsh/vendor-completions/_stowage \
            /usr/share/fish/vendor_completions.d/stowage.fish; do
            [ -s "$f" ] || fail "no completion $f"
        done
        bash --norc -c 'source /usr/share/bash-completion/completions/stowage && complete -p stowage' >/dev/null ||
            fail "the bash completion does not register"
        [ -f /usr/share/doc/stowage/README.md ] && [ -f /usr/share/doc/stowage/docs/policy.md ] ||
            fail "no docs in /usr/share/doc/stowage"
    ) || return 1
    stowage_log "dpkg -L stowage"
    dpkg -L stowage
    stowage_log "dpkg --purge stowage"
    stowage_dpkg --purge stowage || return 1
    STOWAGE_PACKAGE_INSTALLED=0
    if dpkg-query -W -f='${Status}' stowage 2>/dev/null | grep -q installed; then
        echo "package check: still installed after the purge" >&2
        return 1
    fi
    for p in "${STOWAGE_PACKAGE_PATHS[@]}" /usr/share/man/man1/stowage.1.gz \
        /usr/share/bash-completion/completions/stowage /usr/share/doc/stowage; do
        if [ -e "$p" ]; then
            echo "package check: $p is left after the purge" >&2
            return 1
        fi
    done
}
