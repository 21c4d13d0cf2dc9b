//! A CSI client over the driver's Unix socket, with the node calls a test
//! makes in the kubelet's place.

use std::path::Path;

use hyper_util::rt::TokioIo;
use terna::proto::csi as pb;
use tonic::transport::{Channel, Endpoint, Uri};

pub struct Csi {
    pub controller: pb::controller_client::ControllerClient<Channel>,
    pub node: pb::node_client::NodeClient<Channel>,
    pub identity: pb::identity_client::IdentityClient<Channel>,
}

impl Csi {
    pub async fn connect(socket: &Path) -> Csi {
        let socket = socket.to_path_buf();
        let channel = Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        Csi {
            controller: pb::controller_client::ControllerClient::new(channel.clone()),
            node: pb::node_client::NodeClient::new(channel.clone()),
            identity: pb::identity_client::IdentityClient::new(channel),
        }
    }

    pub async fn stage(&mut self, id: &str, staging: &Path, cap: pb::VolumeCapability) {
        self.node
            .node_stage_volume(pb::NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.to_string_lossy().into_owned(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    pub async fn publish(
        &mut self,
        id: &str,
        staging: &Path,
        target: &Path,
        cap: pb::VolumeCapability,
    ) {
        self.node
            .node_publish_volume(pb::NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.to_string_lossy().into_owned(),
                target_path: target.to_string_lossy().into_owned(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    pub async fn unpublish(&mut self, id: &str, target: &Path) {
        self.node
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.to_string_lossy().into_owned(),
            })
            .await
            .unwrap();
    }

    pub async fn unstage(&mut self, id: &str, staging: &Path) {
        self.node
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.to_string_lossy().into_owned(),
            })
            .await
            .unwrap();
    }
}

pub fn mount_cap(fs_type: &str) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Mount(
            pb::volume_capability::MountVolume {
                fs_type: fs_type.into(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
            },
        )),
        access_mode: Some(pb::volume_capability::AccessMode {
            mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

pub fn block_cap() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Block(
            pb::volume_capability::BlockVolume {},
        )),
        access_mode: Some(pb::volume_capability::AccessMode {
            mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

impl Csi {
    pub async fn create(
        &mut self,
        name: &str,
        bytes: i64,
        params: &[(&str, &str)],
        cap: pb::VolumeCapability,
    ) -> Result<pb::Volume, tonic::Status> {
        self.controller
            .create_volume(pb::CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap],
                parameters: params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().volume.unwrap())
    }

    /// The controller's view of the volume's health.
    pub async fn condition(&mut self, id: &str) -> pb::VolumeCondition {
        self.controller
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
            .volume_condition
            .unwrap()
    }

    pub async fn delete(&mut self, id: &str) {
        self.controller
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: id.into(),
                secrets: Default::default(),
            })
            .await
            .unwrap();
    }

    /// DeleteVolume, retried while it answers Aborted (the volume is busy,
    /// e.g. held by background repair a moment), as CSI callers do.
    pub async fn delete_retrying(&mut self, id: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let deleted = self
                .controller
                .delete_volume(pb::DeleteVolumeRequest {
                    volume_id: id.into(),
                    secrets: Default::default(),
                })
                .await;
            match deleted {
                Ok(_) => return,
                Err(s)
                    if s.code() == tonic::Code::Aborted && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(s) => panic!("DeleteVolume {id}: {s:?}"),
            }
        }
    }
}
