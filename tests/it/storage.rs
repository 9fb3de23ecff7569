//! Integration tests: storage. One suite ([`suite`]) runs against both backends: the loopback
//! S3 server that `scripts/s3-server up` starts (s3s-fs, signatures checked, data on disk) and a
//! temporary directory. S3-only behaviour (credentials, missing bucket, a stopped server, a
//! server that refuses aws-chunked uploads) and local-only details have their own files.
//!
//! Each test works under its own bucket prefix or directory, so the tests run in parallel.

pub mod fixture;
mod local_only;
mod s3_only;
mod suite;

/// Instantiates every suite test once per backend.
macro_rules! suite_tests {
    ($($name:ident),* $(,)?) => {
        mod s3 {
            $(
                #[tokio::test]
                async fn $name() {
                    super::suite::$name(super::fixture::Fixture::s3().await).await;
                }
            )*
        }
        mod local {
            $(
                #[tokio::test]
                async fn $name() {
                    super::suite::$name(super::fixture::Fixture::local().await).await;
                }
            )*
        }
    };
}

suite_tests!(
    a_2mb_png_round_trips_byte_identical_with_its_content_type,
    the_same_job_uploaded_twice_leaves_one_object,
    keys_from_hostile_batch_names_stay_inside_the_prefix,
    invalid_keys_are_refused_before_touching_storage,
    the_startup_check_passes_and_leaves_nothing_behind,
    the_startup_check_catches_a_bad_location,
    a_public_base_url_is_recorded_and_maps_back_to_the_key,
    a_missing_object_is_permanent_not_found,
    concurrent_uploads_through_one_shared_storage_all_land,
);
