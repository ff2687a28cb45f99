# shellcheck shell=bash
# `scripts/bench fleet` (issue 16), sourced by scripts/bench: N daemons
# (STOWAGE_BENCH_FLEET_N, default 200) with their own state dirs, one
# registry policy (policy_poll = "10s", dry_run) on a loopback registry of
# their own whose access log counts the requests, the one private engine.
# Measures: registry requests per second while the policy is unchanged,
# push-to-all-converged latency (p50/p99), and a 60 s registry outage
# (everyone alive on the last good policy, convergence after it returns).

FLEET_N=${STOWAGE_BENCH_FLEET_N:-200}
FLEET_POLL=10
FLEET_WINDOW=${STOWAGE_BENCH_FLEET_WINDOW:-60}
FLEET_OUTAGE=${STOWAGE_BENCH_FLEET_OUTAGE:-60}

bench_fleet() {
    local d="$T/fleet" bin=target/release/stowage port reg pids=() i
    mkdir -p "$d"
    port=$(stowage_free_port)
    reg=127.0.0.1:$port
    cat >"$d/registry.yml" <<EOF
version: 0.1
log: { level: info, accesslog: { disabled: false } }
storage: { filesystem: { rootdirectory: $d/data } }
http: { addr: $reg }
EOF
    local reg_pid=""
    fleet_registry_up() {
        docker-registry serve "$d/registry.yml" >>"$d/registry.log" 2>&1 &
        reg_pid=$!
        stowage_wait_for 30 curl -fsS -o /dev/null "http://$reg/v2/"
    }
    fleet_registry_down() { kill "$reg_pid" 2>/dev/null || true; wait "$reg_pid" 2>/dev/null || true; }
    fleet_registry_up
    local oci="oci://$reg/fleet/policy:prod"
    fleet_policy() { # KEEP
        # Relative paths are relative to each host's --state-dir: one
        # control socket per daemon from one policy.
        printf 'version = 1\n[daemon]\npolicy_poll = "%ss"\ndry_run = true\ncontrol_socket = "control.sock"\n[[retain]]\nname = "app"\nimages = ["bench/fleet"]\nkeep_last = %s\n' \
            "$FLEET_POLL" "$1" >"$d/policy.toml"
        "$bin" policy push "$d/policy.toml" "$oci" 2>/dev/null
    }
    # Requests of METHOD in the access log so far.
    fleet_requests() { grep -c "\"$1 /v2/fleet/" "$d/registry.log" || true; }
    # Seconds from EPOCH_S until every daemon logged DIGEST accepted: "p50 p99 max count".
    fleet_latency() { # DIGEST EPOCH_S
        python3 - "$d" "$FLEET_N" "$1" "$2" <<'EOF'
import datetime, glob, sys
d, n, digest, t0 = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
lat = []
for log in glob.glob(f"{d}/s*.log"):
    for line in open(log, errors="replace"):
        if f"new policy {digest} accepted" in line:
            ts = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))
            lat.append(ts.timestamp() - t0)
            break
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))] if lat else float("nan")
print(f"{q(0.5):.2f} {q(0.99):.2f} {lat[-1] if lat else float('nan'):.2f} {len(lat)}")
EOF
    }
    fleet_wait_all() { # DIGEST SECS: every daemon on DIGEST
        local deadline=$((SECONDS + $2))
        while [ "$(grep -l "new policy $1 accepted" "$d"/s*.log 2>/dev/null | wc -l)" -lt "$FLEET_N" ]; do
            [ "$SECONDS" -lt "$deadline" ] || { stowage_log "fleet: not all on $1 after $2 s"; return 1; }
            sleep 0.5
        done
    }
    fleet_alive() { local n=0 p; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done; echo "$n"; }

    local v1 v2 v3
    v1=$(fleet_policy 1)
    stowage_log "fleet: starting $FLEET_N daemons on $oci ($v1)"
    for i in $(seq 1 "$FLEET_N"); do
        "$bin" --engine "$STOWAGE_ENGINE_SOCK" -p "$oci" --state-dir "$d/s$i" run >"$d/s$i.log" 2>&1 &
        pids+=($!)
        sleep 0.02
    done
    local deadline=$((SECONDS + 120))
    while [ "$(grep -l "reconcile .* done" "$d"/s*.log 2>/dev/null | wc -l)" -lt "$FLEET_N" ]; do
        [ "$SECONDS" -lt "$deadline" ] || { stowage_log "fleet: not every daemon reconciled within 120 s"; break; }
        sleep 1
    done
    sleep "$FLEET_POLL"

    # 1. Unchanged policy: requests per second.
    local h0 g0 h1 g1 t_a t_b
    h0=$(fleet_requests HEAD); g0=$(fleet_requests GET); t_a=$(now_s)
    sleep "$FLEET_WINDOW"
    h1=$(fleet_requests HEAD); g1=$(fleet_requests GET); t_b=$(now_s)
    local span heads_s gets_s
    span=$(secs_between "$t_a" "$t_b")
    heads_s=$(awk -v a="$h0" -v b="$h1" -v s="$span" 'BEGIN { printf "%.1f", (b - a) / s }')
    gets_s=$(awk -v a="$g0" -v b="$g1" -v s="$span" 'BEGIN { printf "%.2f", (b - a) / s }')
    stowage_log "fleet: unchanged: $heads_s HEAD/s, $gets_s GET/s over ${span}s (goal ~$((FLEET_N / FLEET_POLL)) HEAD/s, no GET)"

    # 2. A push: time until every daemon runs the new digest.
    local t_push lat2
    t_push=$(now_s)
    v2=$(fleet_policy 2)
    fleet_wait_all "$v2" 60 || true
    lat2=$(fleet_latency "$v2" "$t_push")
    stowage_log "fleet: push to all on $v2: p50/p99/max $(echo "$lat2" | awk '{print $1 "/" $2 "/" $3 " s, " $4}') daemons (goal p99 <= $((FLEET_POLL + 1 + 2)) s)"

    # 3. The registry down for FLEET_OUTAGE s; a new policy right after it returns.
    stowage_log "fleet: registry down for $FLEET_OUTAGE s"
    fleet_registry_down
    sleep "$FLEET_OUTAGE"
    local alive t_back lat3
    alive=$(fleet_alive)
    fleet_registry_up
    t_back=$(now_s)
    v3=$(fleet_policy 3)
    fleet_wait_all "$v3" 60 || true
    lat3=$(fleet_latency "$v3" "$t_back")
    stowage_log "fleet: after the outage: $alive/$FLEET_N alive during it; registry back to all on $v3: p50/p99/max $(echo "$lat3" | awk '{print $1 "/" $2 "/" $3 " s, " $4}') daemons"

    for i in "${pids[@]}"; do kill "$i" 2>/dev/null || true; done
    for i in "${pids[@]}"; do wait "$i" 2>/dev/null || true; done
    fleet_registry_down
    bench_need_python
    bench_record fleet daemons "$FLEET_N" count
    bench_record fleet unchanged_head_rate "$heads_s" per_s
    bench_record fleet unchanged_get_rate "$gets_s" per_s
    bench_record fleet push_p50 "$(echo "$lat2" | cut -d' ' -f1)" s
    bench_record fleet push_p99 "$(echo "$lat2" | cut -d' ' -f2)" s
    bench_record fleet push_converged "$(echo "$lat2" | cut -d' ' -f4)" count
    bench_record fleet outage_alive "$alive" count
    bench_record fleet outage_back_p50 "$(echo "$lat3" | cut -d' ' -f1)" s
    bench_record fleet outage_back_p99 "$(echo "$lat3" | cut -d' ' -f2)" s
    bench_record fleet outage_converged "$(echo "$lat3" | cut -d' ' -f4)" count
}
