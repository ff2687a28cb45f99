//! The tiny HTTP/1.0 client for what bollard 0.21 cannot express, and the
//! engine-wide endpoints read through it: `/info` and `/version`,
//! `GET /system/df` (API < 1.52 answers `LayersSize`, `Images`,
//! `BuildCache`, which bollard's struct drops) and `POST /build/prune`
//! (API < 1.48 reads `keep-storage`, which bollard cannot send).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::messages::one_line;
use super::{DockerEngine, Endpoint};
use crate::engine::{DiskUsage, EngineError, EngineInfo, EngineResult};

impl DockerEngine {
    /// Sends one request without bollard and parses the JSON answer. HTTP/1.0
    /// keeps the answer unchunked and ends it by closing the connection.
    pub(super) async fn raw_json(
        &self,
        method: &str,
        path: &str,
        within: Duration,
    ) -> EngineResult<serde_json::Value> {
        let version = self.docker.client_version();
        let versioned = format!(
            "/v{}.{}{path}",
            version.major_version, version.minor_version
        );
        self.raw_json_at(method, &versioned, path, within).await
    }

    /// [`DockerEngine::raw_json`] at `versioned`, a path with its API
    /// version (Podman's libpod calls carry their own); `path` names it.
    pub(super) async fn raw_json_at(
        &self,
        method: &str,
        versioned: &str,
        path: &str,
        within: Duration,
    ) -> EngineResult<serde_json::Value> {
        let request =
            format!("{method} {versioned} HTTP/1.0\r\nHost: docker\r\nContent-Length: 0\r\n\r\n");
        let unreachable = |e: std::io::Error| match &self.endpoint {
            Endpoint::Tls(_, client) => match client.explain(&e) {
                Some(error) => EngineError::Tls {
                    address: self.address.clone(),
                    error,
                },
                None => EngineError::Unreachable {
                    address: self.address.clone(),
                    message: e.to_string(),
                },
            },
            _ => EngineError::Unreachable {
                address: self.address.clone(),
                message: e.to_string(),
            },
        };
        let exchange = async {
            match &self.endpoint {
                Endpoint::Unix(path) => {
                    http_exchange(tokio::net::UnixStream::connect(path).await?, &request).await
                }
                Endpoint::Tcp(host) => {
                    http_exchange(tokio::net::TcpStream::connect(host).await?, &request).await
                }
                Endpoint::Tls(host, client) => {
                    http_exchange(client.stream(host).await?, &request).await
                }
            }
        };
        let answer = self
            .bounded(&format!("{method} {path}"), within, async {
                exchange.await.map_err(unreachable)
            })
            .await?;

        let text = String::from_utf8_lossy(&answer);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| EngineError::Other(format!("{method} {path}: malformed answer")))?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let value: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        if !(200..300).contains(&status) {
            let message = value["message"]
                .as_str()
                .map_or_else(|| one_line(body), one_line);
            return Err(match status {
                404 => EngineError::NotFound(message),
                409 => EngineError::Conflict(message),
                _ => EngineError::Other(format!("{method} {path}: {status} {message}")),
            });
        }
        Ok(value)
    }
}

async fn http_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &str,
) -> std::io::Result<Vec<u8>> {
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    Ok(answer)
}

pub(super) async fn info(engine: &DockerEngine) -> EngineResult<EngineInfo> {
    let info = engine.raw_json("GET", "/info", engine.timeout).await?;
    let version = engine.raw_json("GET", "/version", engine.timeout).await?;
    let platform = platform_of(
        version["Os"].as_str().unwrap_or_default(),
        version["Arch"].as_str().unwrap_or_default(),
        info["Architecture"].as_str().unwrap_or_default(),
    );
    Ok(EngineInfo {
        kind: engine.kind,
        platform,
        data_root: info["DockerRootDir"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        server_version: version["Version"].as_str().unwrap_or_default().to_owned(),
        api_version: version["ApiVersion"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    })
}

/// The engine's default platform: the version asked at connect, and
/// `/info` only on arm, whose variant only the machine name tells.
pub(super) async fn platform(engine: &DockerEngine) -> EngineResult<String> {
    let (os, arch) = (engine.os.as_str(), engine.arch.as_str());
    let machine = if arch == "arm" {
        let info = engine.raw_json("GET", "/info", engine.timeout).await?;
        info["Architecture"].as_str().unwrap_or_default().to_owned()
    } else {
        String::new()
    };
    Ok(platform_of(os, arch, &machine))
}

/// `os/arch[/variant]` from the engine's `Os` and `Arch` (Go's names) and
/// its machine (`uname -m`: `armv7l`, `armv6l`): the variant an arm engine
/// pulls for. An engine that names neither is taken for `linux/amd64`.
fn platform_of(os: &str, arch: &str, machine: &str) -> String {
    let os = if os.is_empty() { "linux" } else { os };
    let arch = if arch.is_empty() { "amd64" } else { arch };
    let variant = match arch {
        "arm" => Some(match machine {
            m if m.starts_with("armv6") => "v6",
            m if m.starts_with("armv5") => "v5",
            _ => "v7",
        }),
        _ => None,
    };
    match variant {
        Some(v) => format!("{os}/{arch}/{v}"),
        None => format!("{os}/{arch}"),
    }
}

pub(super) async fn disk_usage(engine: &DockerEngine) -> EngineResult<DiskUsage> {
    // Sizing every layer takes a while on a large host.
    let df = engine.raw_json("GET", "/system/df", engine.slow()).await?;
    if df.get("ImageUsage").is_some() {
        // API >= 1.52: per-kind summaries.
        return Ok(DiskUsage {
            layers_size: as_u64(&df["ImageUsage"]["TotalSize"]),
            images: as_u64(&df["ImageUsage"]["TotalCount"]),
            build_cache_size: as_u64(&df["BuildCacheUsage"]["TotalSize"]),
        });
    }
    let build_cache_size = df["BuildCache"]
        .as_array()
        .map(|records| {
            records
                .iter()
                // Shared records are counted by the record that owns them.
                .filter(|r| !r["Shared"].as_bool().unwrap_or(false))
                .map(|r| as_u64(&r["Size"]))
                .sum()
        })
        .unwrap_or(0);
    Ok(DiskUsage {
        layers_size: as_u64(&df["LayersSize"]),
        images: df["Images"].as_array().map_or(0, |a| a.len() as u64),
        build_cache_size,
    })
}

pub(super) async fn prune_build_cache(engine: &DockerEngine, keep_bytes: u64) -> EngineResult<u64> {
    // `keep-storage` for API < 1.48, `reserved-space` after; each engine
    // ignores the one it does not know.
    let path = format!("/build/prune?keep-storage={keep_bytes}&reserved-space={keep_bytes}");
    let answer = engine.raw_json("POST", &path, engine.slow()).await?;
    Ok(as_u64(&answer["SpaceReclaimed"]))
}

pub(super) fn as_u64(value: &serde_json::Value) -> u64 {
    value.as_u64().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_platform_is_its_os_arch_and_arm_variant() {
        assert_eq!(platform_of("linux", "amd64", "x86_64"), "linux/amd64");
        assert_eq!(platform_of("linux", "arm64", "aarch64"), "linux/arm64");
        assert_eq!(platform_of("linux", "arm", "armv7l"), "linux/arm/v7");
        assert_eq!(platform_of("linux", "arm", "armv6l"), "linux/arm/v6");
        assert_eq!(platform_of("windows", "amd64", ""), "windows/amd64");
        assert_eq!(platform_of("", "", ""), "linux/amd64");
    }
}
