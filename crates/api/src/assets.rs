//! The dashboard's static files, embedded in the binary: the page, its
//! script and style, and the vendored chart library (Chart.js 4.6.1, MIT,
//! `assets/vendor/`). Nothing is fetched from elsewhere at run time.

/// One embedded file.
#[derive(Clone, Copy, Debug)]
pub struct Asset {
    pub body: &'static [u8],
    pub content_type: &'static str,
}

/// The dashboard page, served at `/`.
pub const INDEX: Asset = Asset {
    body: include_bytes!("../assets/index.html"),
    content_type: "text/html; charset=utf-8",
};

const FILES: [(&str, Asset); 4] = [
    (
        "dashboard.js",
        Asset {
            body: include_bytes!("../assets/dashboard.js"),
            content_type: "text/javascript; charset=utf-8",
        },
    ),
    (
        "dashboard.css",
        Asset {
            body: include_bytes!("../assets/dashboard.css"),
            content_type: "text/css; charset=utf-8",
        },
    ),
    (
        "vendor/chart.umd.min.js",
        Asset {
            body: include_bytes!("../assets/vendor/chart.umd.min.js"),
            content_type: "text/javascript; charset=utf-8",
        },
    ),
    (
        "vendor/chart.js.LICENSE.md",
        Asset {
            body: include_bytes!("../assets/vendor/chart.js.LICENSE.md"),
            content_type: "text/plain; charset=utf-8",
        },
    ),
];

/// The file under `/assets/{path}`.
pub fn get(path: &str) -> Option<Asset> {
    FILES.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_links_only_embedded_files() {
        let page = std::str::from_utf8(INDEX.body).unwrap_or_default();
        for part in page.split("assets/").skip(1) {
            let path: String = part.chars().take_while(|c| *c != '"').collect();
            assert!(
                get(&path).is_some(),
                "page links assets/{path}, not embedded"
            );
        }
        assert!(!page.contains("http://") && !page.contains("https://"));
        assert!(get("vendor/chart.umd.min.js").is_some_and(|a| a.body.len() > 100_000));
    }
}
