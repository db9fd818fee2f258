//! HTTP API and the web page (issue 6; not built yet).
