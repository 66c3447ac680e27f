# kind's node base image, rebuilt from Debian packages (no registry): the debootstrapped bookworm image plus Debian's
# containerd, runc and CNI plugins in place of kind's own builds. kind's boot files (entrypoint, systemd units,
# containerd config, /kind/bin helpers) come from the sigs.k8s.io/kind module of $KIND_VERSION (copied into files/ by
# node-image.sh). Follows the shape of kind's images/base/Dockerfile, whose base is debian:bookworm-slim too.
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      systemd systemd-sysv dbus conntrack iptables nftables iproute2 ethtool util-linux mount kmod libseccomp2 pigz \
      e2fsprogs bash ca-certificates curl jq procps containerd runc containernetworking-plugins \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/log/* /usr/share/doc/* /usr/share/man/*
COPY files/ /
# The systemd trimming kind does for a container PID 1; containerd and CNI at the paths kind's files expect; the CRI
# base spec with kind's mount hook and without rlimits (kind's own recipe).
RUN chmod 0755 /usr/local/bin/* /kind /kind/bin /kind/bin/* \
 && find /lib/systemd/system/sysinit.target.wants/ -name systemd-tmpfiles-setup.service -delete \
 && rm -f /lib/systemd/system/multi-user.target.wants/* /etc/systemd/system/*.wants/* \
      /lib/systemd/system/local-fs.target.wants/* /lib/systemd/system/sockets.target.wants/*udev* \
      /lib/systemd/system/sockets.target.wants/*initctl* /lib/systemd/system/basic.target.wants/* \
 && echo "ReadKMsg=no" >> /etc/systemd/journald.conf \
 && ln -sf /usr/lib/systemd/systemd /sbin/init \
 && ln -sf /usr/bin/containerd /usr/local/bin/containerd \
 && mkdir -p /opt/cni /etc/kubernetes/manifests && ln -sfn /usr/lib/cni /opt/cni/bin \
 && ctr oci spec \
      | jq '.hooks.createContainer += [{"path": "/kind/bin/mount-product-files.sh"}] | del(.process.rlimits)' \
      > /etc/containerd/cri-base.json \
 && systemctl enable kubelet.service containerd.service undo-mount-hacks.service \
 && systemctl mask systemd-binfmt.service \
 && grep -q 'restrict_oom_score_adj = false' /etc/containerd/config.toml \
 && sed -i 's/restrict_oom_score_adj = false/restrict_oom_score_adj = true/' /etc/containerd/config.toml
# restrict_oom_score_adj = true: root on this machine kind lacks CAP_SYS_RESOURCE, so runc cannot set the negative
# oom_score_adj the kubelet asks for (-998 for pod sandboxes: "can't get final child's PID from pipe"); containerd
# then clamps the value to its own score instead.
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]
