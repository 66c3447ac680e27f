# Test-only images (kpipe/test-sink, kpipe/test-http): one e2e test binary built by cargo, on the same small
# non-root base as the kpipe images.
#   cargo build --release -p kpipe-e2e --bin kpipe-test-sink
#   docker build -f e2e/test.Dockerfile --build-arg BIN=kpipe-test-sink -t kpipe/test-sink:<version> <folder of it>
ARG BASE_IMAGE=gcr.io/distroless/cc-debian12:nonroot
FROM ${BASE_IMAGE}
ARG BIN
COPY ${BIN} /usr/local/bin/test-binary
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/test-binary"]
