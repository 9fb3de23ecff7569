//! The dashboard's stylesheet and script, embedded in the binary. Each is served under a name
//! that carries a digest of its content (`/static/app.3f2a9c1e.css`), so it can be cached for a
//! year (`immutable`) and a new build's pages ask for the new file.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::http::problem::Problem;

/// One embedded file.
pub struct Asset {
    /// The path pages link, digest included.
    pub path: String,
    pub content_type: &'static str,
    pub body: &'static str,
}

fn asset(stem: &str, ext: &str, content_type: &'static str, body: &'static str) -> Asset {
    let digest = hex::encode(&Sha256::digest(body.as_bytes())[..6]);
    Asset {
        path: format!("/static/{stem}.{digest}.{ext}"),
        content_type,
        body,
    }
}

pub static CSS: LazyLock<Asset> = LazyLock::new(|| {
    asset(
        "app",
        "css",
        "text/css; charset=utf-8",
        include_str!("../../../templates/dashboard/static/app.css"),
    )
});

pub static JS: LazyLock<Asset> = LazyLock::new(|| {
    asset(
        "app",
        "js",
        "text/javascript; charset=utf-8",
        include_str!("../../../templates/dashboard/static/app.js"),
    )
});

pub static ICON: LazyLock<Asset> = LazyLock::new(|| {
    asset(
        "icon",
        "svg",
        "image/svg+xml",
        include_str!("../../../templates/dashboard/static/icon.svg"),
    )
});

/// `GET /static/{name}`: only the current digests exist.
pub async fn serve(Path(name): Path<String>) -> Response {
    let wanted = format!("/static/{name}");
    for a in [&*CSS, &*JS, &*ICON] {
        if a.path == wanted {
            return (
                [
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(a.content_type),
                    ),
                    (
                        header::CACHE_CONTROL,
                        HeaderValue::from_static("public, max-age=31536000, immutable"),
                    ),
                ],
                a.body,
            )
                .into_response();
        }
    }
    Problem::not_found(format!("no such file: {wanted}")).into_response()
}
