//! Verify the EKS token the way the server side does: decode it, rebuild the SigV4
//! canonical request from the URL (an independent implementation here, on ring's
//! SHA-256/HMAC), and check that the signature matches the secret key. A wrong canonical
//! form, a missing signed `x-k8s-aws-id` header or a wrong scope all fail here.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: panics are failures

use std::time::{Duration, SystemTime};

use hybridlet_aws::{Credentials, eks_token};
use hybridlet_fixtures::eks_token::verify;

#[test]
fn server_side_verification_accepts_our_token_and_rejects_tampering() {
    let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    let creds = Credentials::new("AKIDEXAMPLE", secret, None, None, "test");
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_600_000);
    let token = eks_token(&creds, "us-west-2", "prod-hybrid", now)
        .unwrap()
        .token;
    assert_eq!(verify(&token, secret, "prod-hybrid").unwrap(), "us-west-2");
    // The same token presented for another cluster, or checked with another key, fails.
    assert!(
        verify(&token, secret, "other-cluster")
            .unwrap_err()
            .contains("signature mismatch")
    );
    assert!(verify(&token, "not-the-secret", "prod-hybrid").is_err());
}
