# shellcheck shell=bash
# Shared shell functions for scripts/test, scripts/try and scripts/bench:
# install the engine packages, start and stop a PRIVATE dockerd and registry.
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
#   ...
#   stowage_stop_all

# Pids of what this shell started, so stowage_stop_all ends only those.
STOWAGE_PIDS_ENGINE=()
STOWAGE_PIDS_REGISTRY=()

stowage_log() { printf '==> %s\n' "$*" >&2; }

# Install docker.io, docker-registry, busybox-static, skopeo and apache2-utils when any of
# their commands is missing (CI runs on a fresh Debian machine as root).
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

# Stop every registry and engine this shell started (registries first, so an
# engine never waits on a registry that is going away).
stowage_stop_all() {
    local pid
    for pid in "${STOWAGE_PIDS_REGISTRY[@]}"; do
        stowage_stop_pid "$pid"
    done
    for pid in "${STOWAGE_PIDS_ENGINE[@]}"; do
        stowage_stop_pid "$pid"
    done
    STOWAGE_PIDS_REGISTRY=()
    STOWAGE_PIDS_ENGINE=()
}
