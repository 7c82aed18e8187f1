//! Verify the EKS token the way the server side does: decode it, rebuild the SigV4
//! canonical request from the URL (an independent implementation here, on ring's
//! SHA-256/HMAC), and check that the signature matches the secret key. A wrong canonical
//! form, a missing signed `x-k8s-aws-id` header or a wrong scope all fail here.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use hybridlet_aws::{Credentials, eks_token};
use ring::{digest, hmac};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
        .as_ref()
        .to_vec()
}

/// What an authenticator does with a token before replaying it to STS.
fn verify(token: &str, secret: &str, cluster: &str) -> Result<(), String> {
    let b64 = token
        .strip_prefix("k8s-aws-v1.")
        .ok_or("no k8s-aws-v1. prefix")?;
    let url = String::from_utf8(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(b64)
            .map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let rest = url.strip_prefix("https://").ok_or("not https")?;
    let (host, path_query) = rest.split_once('/').ok_or("no path")?;
    let (path, query) = path_query.split_once('?').ok_or("no query")?;
    if !path.is_empty() || !host.starts_with("sts.") {
        return Err(format!("unexpected host or path: {host} /{path}"));
    }
    let params: BTreeMap<&str, &str> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let signed_headers = params
        .get("X-Amz-SignedHeaders")
        .ok_or("no SignedHeaders")?;
    if *signed_headers != "host%3Bx-k8s-aws-id" {
        return Err(format!("x-k8s-aws-id is not signed: {signed_headers}"));
    }
    let expires: u64 = params["X-Amz-Expires"].parse().map_err(|_| "bad expires")?;
    if expires > 900 {
        return Err("X-Amz-Expires over 900".into());
    }
    let amz_date = params["X-Amz-Date"];
    let credential = params["X-Amz-Credential"].replace("%2F", "/");
    let scope_parts: Vec<&str> = credential.splitn(2, '/').collect();
    let scope = scope_parts[1];
    let (date, rest) = scope.split_once('/').unwrap();
    let (region, rest) = rest.split_once('/').unwrap();
    if rest != "sts/aws4_request" {
        return Err(format!("scope {scope} is not for sts"));
    }
    // Canonical query: every parameter but the signature, sorted (already URI-encoded).
    let canonical_query = params
        .iter()
        .filter(|(k, _)| **k != "X-Amz-Signature")
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let canonical_request = format!(
        "GET\n/\n{canonical_query}\nhost:{host}\nx-k8s-aws-id:{cluster}\n\nhost;x-k8s-aws-id\n{}",
        hex(digest::digest(&digest::SHA256, b"").as_ref())
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(digest::digest(&digest::SHA256, canonical_request.as_bytes()).as_ref())
    );
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date);
    let k_region = hmac(&k_date, region);
    let k_service = hmac(&k_region, "sts");
    let k_signing = hmac(&k_service, "aws4_request");
    let expected = hex(&hmac(&k_signing, &string_to_sign));
    if expected != params["X-Amz-Signature"] {
        return Err(format!(
            "signature mismatch: expected {expected}, token has {}",
            params["X-Amz-Signature"]
        ));
    }
    Ok(())
}

#[test]
fn server_side_verification_accepts_our_token_and_rejects_tampering() {
    let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    let creds = Credentials::new("AKIDEXAMPLE", secret, None, None, "test");
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_600_000);
    let token = eks_token(&creds, "us-west-2", "prod-hybrid", now)
        .unwrap()
        .token;
    verify(&token, secret, "prod-hybrid").unwrap();
    // The same token presented for another cluster, or checked with another key, fails.
    assert!(
        verify(&token, secret, "other-cluster")
            .unwrap_err()
            .contains("signature mismatch")
    );
    assert!(verify(&token, "not-the-secret", "prod-hybrid").is_err());
}
