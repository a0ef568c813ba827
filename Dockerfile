# CXR Lens DICOM node on the TensorFlow GPU image. Build: docker build -t cxr-lens .
# Run:  docker run --gpus all -p 11112:11112 -p 8080:8080 -v cxr-lens-spool:/var/lib/cxr-lens \
#         -v $PWD/my-config.toml:/etc/cxr-lens/cxr-lens.toml:ro cxr-lens
FROM tensorflow/tensorflow:2.21.0-gpu

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libopenjp2-7 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cxr-lens
COPY pyproject.toml README.md ./
COPY dicom_node ./dicom_node
COPY explain ./explain
COPY models ./models
COPY config ./config
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /var/lib/cxr-lens --create-home cxrlens \
    && mkdir -p /etc/cxr-lens && cp config/cxr-lens.toml /etc/cxr-lens/cxr-lens.toml

ENV CXR_LENS_CONFIG=/etc/cxr-lens/cxr-lens.toml \
    CXR_LENS_NODE__SPOOL_DIR=/var/lib/cxr-lens \
    TF_CPP_MIN_LOG_LEVEL=2
VOLUME ["/var/lib/cxr-lens"]
EXPOSE 11112 8080
USER cxrlens
CMD ["cxr-lens", "serve"]
