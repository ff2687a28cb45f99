//! The one module that knows bollard. (Being written.)
pub struct DockerEngine;
