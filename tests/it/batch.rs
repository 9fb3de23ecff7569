//! Batches from files on real Postgres, the stand-in provider and the loopback S3 server:
//! submitting CSV and JSONL (quotes, newlines, emoji, overrides, types), refusing bad files
//! whole, dry runs, budgets, re-submits and edits, the old budgets table as a view, the batch's
//! default callback URL, and the report in CSV, JSON and HTML (every thumbnail embedded).

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use imagegen::batch::report::{self, ReportFormat, ReportOptions};
use imagegen::batch::submit::{SubmitError, SubmitReport};
use imagegen::batch::{self, Format, RowDefaults, SubmitOptions};
use imagegen::openrouter::fake::{FakeConfig, FakeServer};
use imagegen::openrouter::{Client, Config as ClientConfig};
use imagegen::pipeline::{Pipeline, PipelineConfig};
use imagegen::queue::Queue;
use imagegen::storage::{Storage, StorageConfig};
use imagegen::worker::Worker;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;

use crate::helpers::fast_config;
use crate::storage::fixture::{S3, open_s3_at};

const KEY: &str = "sk-or-test-batch-key";

fn options(batch: &str, format: Format) -> SubmitOptions {
    SubmitOptions {
        batch: batch.to_owned(),
        source_name: format!("{batch}.file"),
        format,
        template: None,
        key: None,
        defaults: RowDefaults::default(),
        dry_run: false,
        budget_usd: None,
        force: false,
        regenerate_changed: false,
    }
}

async fn submit(q: &Queue, file: &str, opts: &SubmitOptions) -> Result<SubmitReport, SubmitError> {
    batch::submit(q, file.as_bytes(), opts, &mut |_| {}).await
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    idempotency_key: String,
    prompt: String,
    aspect_ratio: String,
    model: String,
    priority: i32,
    max_attempts: i32,
    renditions: Vec<String>,
    metadata: Value,
    batch_seq: Option<i64>,
    state: String,
}

async fn rows(pool: &PgPool, batch: &str) -> Vec<Row> {
    sqlx::query_as(
        "SELECT idempotency_key, prompt, aspect_ratio, model, priority, max_attempts, renditions, \
             metadata, batch_seq, state \
         FROM imagegen.jobs WHERE batch = $1 ORDER BY batch_seq NULLS LAST, id",
    )
    .bind(batch)
    .fetch_all(pool)
    .await
    .unwrap()
}

const POSTS_CSV: &str = "\u{feff}slug,title,summary,aspect_ratio,priority,renditions,model\n\
intro,\"Hello, world\",\"Line one\nline two, with \"\"quotes\"\"\",,,,\n\
emoji,Ünïcødé 🎉 post,Short,1:1,5,\"og, webp\",\n\
pro,Pro post,Big,,-3,,google/gemini-3-pro-image-preview\n";

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_csv_with_quotes_newlines_emoji_and_overrides_becomes_its_jobs(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let mut o = options("posts", Format::Csv);
    o.template = Some("Header for \"{title}\": {summary}. No text. {{literal}}".into());
    o.key = Some("{slug}".into());
    o.defaults.aspect_ratio = Some("3:2".into());
    o.defaults.renditions = vec!["thumb".into()];
    let r = submit(&q, POSTS_CSV, &o).await.unwrap();
    assert_eq!((r.rows, r.new_jobs, r.inserted), (3, 3, 3));

    let got = rows(&pool, "posts").await;
    let keys: Vec<&str> = got.iter().map(|r| r.idempotency_key.as_str()).collect();
    assert_eq!(keys, ["posts:intro", "posts:emoji", "posts:pro"]);
    assert_eq!(
        got[0].prompt,
        "Header for \"Hello, world\": Line one\nline two, with \"quotes\". No text. {literal}"
    );
    assert_eq!(
        got[1].prompt,
        "Header for \"Ünïcødé 🎉 post\": Short. No text. {literal}"
    );
    // Options, and the row's overrides of them.
    assert_eq!((got[0].aspect_ratio.as_str(), got[0].priority), ("3:2", 0));
    assert_eq!(got[0].renditions, ["thumb"]);
    assert_eq!(got[0].model, "google/gemini-2.5-flash-image");
    assert_eq!((got[1].aspect_ratio.as_str(), got[1].priority), ("1:1", 5));
    assert_eq!(got[1].renditions, ["og", "webp"]);
    assert_eq!(got[2].model, "google/gemini-3-pro-image-preview");
    assert_eq!(got[2].priority, -3);
    let seqs: Vec<Option<i64>> = got.iter().map(|r| r.batch_seq).collect();
    assert_eq!(seqs, [Some(0), Some(1), Some(2)]);
    // The row's columns, as strings, in the metadata.
    assert_eq!(got[1].metadata["title"], "Ünïcødé 🎉 post");
    assert_eq!(got[1].metadata["priority"], "5");
    assert_eq!(
        got[0].metadata["summary"],
        "Line one\nline two, with \"quotes\""
    );

    let record = q.batch_record("posts").await.unwrap().unwrap();
    assert_eq!(record.source.as_deref(), Some("posts.file"));
    assert_eq!(record.template, o.template);
    assert_eq!(record.key_template.as_deref(), Some("{slug}"));
    assert_eq!(
        record.columns,
        [
            "slug",
            "title",
            "summary",
            "aspect_ratio",
            "priority",
            "renditions",
            "model"
        ]
    );
    assert_eq!(record.defaults["aspect_ratio"], "3:2");
    assert_eq!(record.defaults["renditions"], json!(["thumb"]));
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_jsonl_file_keeps_its_json_types(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let file = "{\"slug\":\"a\",\"title\":\"A\",\"views\":12,\"tags\":[\"x\",\"y\"],\"draft\":false,\"priority\":3}\n\
                \n\
                {\"slug\":\"b\",\"title\":\"B\",\"views\":1.5,\"renditions\":[\"og\"],\"max_attempts\":5}\n";
    let mut o = options("feed", Format::Jsonl);
    o.template = Some("{title} ({views})".into());
    o.key = Some("{slug}".into());
    let r = submit(&q, file, &o).await.unwrap();
    assert_eq!(r.inserted, 2);
    let got = rows(&pool, "feed").await;
    assert_eq!(got[0].prompt, "A (12)");
    assert_eq!(got[1].prompt, "B (1.5)");
    assert_eq!(got[0].metadata["views"], json!(12));
    assert_eq!(got[0].metadata["tags"], json!(["x", "y"]));
    assert_eq!(got[0].metadata["draft"], json!(false));
    assert_eq!(got[0].priority, 3);
    assert_eq!(got[1].renditions, ["og"]);
    assert_eq!(got[1].max_attempts, 5);
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_bad_file_names_every_bad_row_by_line_and_enqueues_nothing(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let file = "slug,prompt,aspect_ratio,max_attempts\n\
                a,\"fine, and\nspanning two lines\",,\n\
                b,fine,7:3,\n\
                c,   ,,\n\
                d,fine,,\n\
                a,dup,,\n\
                e,fine,,99\n\
                f,too,many,fields,here\n";
    let mut o = options("bad", Format::Csv);
    o.key = Some("{slug}".into());
    let Err(SubmitError::Invalid(errors)) = submit(&q, file, &o).await else {
        panic!("a file with bad rows must be refused");
    };
    let lines: Vec<u64> = errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, [4, 5, 7, 8, 9], "{errors:?}");
    assert!(errors[0].reason.contains("aspect_ratio"), "{}", errors[0]);
    assert!(errors[1].reason.contains("blank"), "{}", errors[1]);
    assert!(errors[2].reason.contains("line 2"), "{}", errors[2]);
    assert!(errors[3].reason.contains("max_attempts"), "{}", errors[3]);
    assert!(errors[4].reason.contains("fields"), "{}", errors[4]);
    assert_eq!(count(&pool, "SELECT count(*) FROM imagegen.jobs").await, 0);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM imagegen.batches").await,
        0
    );

    // A JSONL placeholder a row lacks is that row's error.
    let mut o = options("bad", Format::Jsonl);
    o.template = Some("{title}: {summary}".into());
    let Err(SubmitError::Invalid(errors)) = submit(
        &q,
        "{\"title\":\"x\",\"summary\":\"y\"}\n{\"title\":\"z\"}\nnot json\n",
        &o,
    )
    .await
    else {
        panic!("a JSONL file with bad rows must be refused");
    };
    let lines: Vec<u64> = errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, [2, 3], "{errors:?}");
    assert!(errors[0].reason.contains("summary"));
    assert_eq!(count(&pool, "SELECT count(*) FROM imagegen.jobs").await, 0);
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_dry_run_prices_the_file_and_writes_nothing(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let mut o = options("dry", Format::Csv);
    o.template = Some("Header: {title}".into());
    o.dry_run = true;
    let file = "title,model,image_size\nOne,,\nTwo,,\nThree,google/gemini-3-pro-image-preview,2K\nFour,,\n";
    let r = submit(&q, file, &o).await.unwrap();
    assert!(r.dry_run);
    assert_eq!((r.rows, r.new_jobs, r.inserted), (4, 4, 0));
    assert_eq!(
        r.first_prompts,
        ["Header: One", "Header: Two", "Header: Three"]
    );
    // Flash at $0.04, pro 2K at $0.15 (the price table's expected cost per call).
    assert_eq!(r.estimate.total_usd, Decimal::new(27, 2));
    assert_eq!(r.estimate.lines.len(), 2);
    assert_eq!(count(&pool, "SELECT count(*) FROM imagegen.jobs").await, 0);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM imagegen.batches").await,
        0
    );
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_budget_too_small_for_the_estimate_refuses_unless_forced(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let file: String = std::iter::once("prompt\n".to_owned())
        .chain((0..10).map(|i| format!("header {i}\n")))
        .collect();
    let mut o = options("capped", Format::Csv);
    o.budget_usd = Some(Decimal::new(30, 2));
    let Err(SubmitError::OverBudget(check)) = submit(&q, &file, &o).await else {
        panic!("ten flash jobs ($0.40) must not fit $0.30");
    };
    assert_eq!(check.estimate_usd, Decimal::new(40, 2));
    assert_eq!(count(&pool, "SELECT count(*) FROM imagegen.jobs").await, 0);
    assert_eq!(q.batch_budget("capped").await.unwrap(), None);

    o.force = true;
    let r = submit(&q, &file, &o).await.unwrap();
    assert_eq!(r.inserted, 10);
    assert!(r.budget.unwrap().exceeded());
    assert_eq!(
        q.batch_budget("capped").await.unwrap(),
        Some(Decimal::new(30, 2))
    );

    // The budget now on the batch counts its ten jobs still to run: one more row does not fit.
    let mut more = options("capped", Format::Csv);
    more.budget_usd = Some(Decimal::new(42, 2));
    let Err(SubmitError::OverBudget(check)) =
        submit(&q, &format!("{file}header 10\n"), &more).await
    else {
        panic!("$0.40 to run plus $0.04 must not fit $0.42");
    };
    assert_eq!(check.committed_usd, Decimal::new(40, 2));
    more.budget_usd = Some(Decimal::new(44, 2));
    let r = submit(&q, &format!("{file}header 10\n"), &more)
        .await
        .unwrap();
    assert_eq!((r.inserted, r.unchanged), (1, 10));
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_resubmit_adds_nothing_and_an_edited_file_reports_its_changed_rows(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let mut o = options("site", Format::Csv);
    o.template = Some("Header for {title}".into());
    o.key = Some("{slug}".into());
    let first = "slug,title\na,Alpha\nb,Beta\nc,Gamma\n";
    assert_eq!(submit(&q, first, &o).await.unwrap().inserted, 3);
    let again = submit(&q, first, &o).await.unwrap();
    assert_eq!(
        (again.inserted, again.unchanged, again.changed.len()),
        (0, 3, 0)
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM imagegen.jobs").await, 3);

    // Edited: a row added at the top, Beta retitled.
    let edited = "slug,title\nz,Zeta\na,Alpha\nb,Beta (new)\nc,Gamma\n";
    let r = submit(&q, edited, &o).await.unwrap();
    assert_eq!((r.inserted, r.unchanged), (1, 2));
    assert_eq!(r.changed.len(), 1);
    assert_eq!(r.changed[0].key, "b");
    assert_eq!(r.changed[0].line, 4);
    assert_eq!(r.changed[0].fields, ["prompt"]);
    assert_eq!(r.regenerated, 0);
    let got = rows(&pool, "site").await;
    let order: Vec<&str> = got.iter().map(|r| r.idempotency_key.as_str()).collect();
    assert_eq!(order, ["site:z", "site:a", "site:b", "site:c"]);
    // Reported, not applied.
    assert_eq!(got[2].prompt, "Header for Beta");

    // Finished, then regenerated on request: pending again with the file's prompt.
    sqlx::query("UPDATE imagegen.jobs SET state = 'succeeded', attempts = 1 WHERE batch = 'site'")
        .execute(&pool)
        .await
        .unwrap();
    o.regenerate_changed = true;
    let r = submit(&q, edited, &o).await.unwrap();
    assert_eq!((r.inserted, r.regenerated), (0, 1));
    let got = rows(&pool, "site").await;
    assert_eq!(got[2].prompt, "Header for Beta (new)");
    assert_eq!(got[2].state, "pending");
    assert_eq!(got[1].state, "succeeded");
    // Regenerated as its next generation (the images of the first stay as history).
    let generations: Vec<i32> = sqlx::query_scalar(
        "SELECT generation FROM imagegen.jobs WHERE batch = 'site' ORDER BY batch_seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(generations, [1, 1, 2, 1]);
    // A changed row whose job has not run yet is changed in place.
    sqlx::query("UPDATE imagegen.jobs SET state = 'pending' WHERE idempotency_key = 'site:z'")
        .execute(&pool)
        .await
        .unwrap();
    let latest = "slug,title\nz,Zeta 2\na,Alpha\nb,Beta (new)\nc,Gamma\n";
    let r = submit(&q, latest, &o).await.unwrap();
    assert_eq!((r.changed.len(), r.regenerated), (1, 1));
    let z: (String, i32, String) = sqlx::query_as(
        "SELECT prompt, generation, state FROM imagegen.jobs WHERE idempotency_key = 'site:z'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(z, ("Header for Zeta 2".to_owned(), 1, "pending".to_owned()));
    let again = submit(&q, latest, &o).await.unwrap();
    assert_eq!((again.inserted, again.changed.len()), (0, 0));

    // Without --key, the content hash is the key: the same file adds nothing either.
    let h = options("hashed", Format::Csv);
    assert_eq!(
        submit(&q, "prompt\none\ntwo\n", &h).await.unwrap().inserted,
        2
    );
    let r = submit(&q, "prompt\none\ntwo\nthree\n", &h).await.unwrap();
    assert_eq!((r.inserted, r.unchanged), (1, 2));
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn the_budgets_table_lives_on_as_a_view_and_batches_lend_their_callback_url(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let exec = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query(sql).execute(&pool).await }
    };
    // Apps' SQL against the old table.
    exec("INSERT INTO imagegen.batch_budgets (batch, budget_usd) VALUES ('app', 5)")
        .await
        .unwrap();
    exec(
        "INSERT INTO imagegen.batch_budgets (batch, budget_usd) VALUES ('app', 7) \
         ON CONFLICT (batch) DO UPDATE SET budget_usd = EXCLUDED.budget_usd, updated_at = now()",
    )
    .await
    .unwrap();
    assert_eq!(q.batch_budget("app").await.unwrap(), Some(Decimal::from(7)));
    exec("UPDATE imagegen.batch_budgets SET budget_usd = 9 WHERE batch = 'app'")
        .await
        .unwrap();
    assert_eq!(q.batch_budget("app").await.unwrap(), Some(Decimal::from(9)));
    let e = exec("INSERT INTO imagegen.batch_budgets (batch, budget_usd) VALUES ('neg', -1)")
        .await
        .unwrap_err();
    assert_eq!(
        e.as_database_error().and_then(|d| d.constraint()),
        Some("batch_budgets_budget_not_negative")
    );

    // A batch submitted without a budget gets one by a plain INSERT, as before.
    let mut o = options("filed", Format::Csv);
    o.defaults.callback_url = Some("https://hooks.example.com/done".into());
    submit(&q, "prompt\none\n", &o).await.unwrap();
    exec("INSERT INTO imagegen.batch_budgets (batch, budget_usd) VALUES ('filed', 3)")
        .await
        .unwrap();
    assert_eq!(
        q.batch_budget("filed").await.unwrap(),
        Some(Decimal::from(3))
    );
    // DELETE removes the budget, not the batch.
    exec("DELETE FROM imagegen.batch_budgets WHERE batch = 'filed'")
        .await
        .unwrap();
    assert_eq!(q.batch_budget("filed").await.unwrap(), None);
    let record = q.batch_record("filed").await.unwrap().unwrap();
    assert_eq!(record.source.as_deref(), Some("filed.file"));
    // The API's batch queries still read it.
    let s = q.batch_summary("app").await.unwrap().unwrap();
    assert_eq!(s.budget_usd, Some(Decimal::from(9)));

    // Plain INSERTs: a new batch name works; a batch's default callback URL fills in, a job's
    // own wins.
    exec(
        "INSERT INTO imagegen.jobs (prompt, batch) VALUES ('plain', 'brand-new'), \
             ('lent', 'filed')",
    )
    .await
    .unwrap();
    exec(
        "INSERT INTO imagegen.jobs (prompt, batch, callback_url) \
         VALUES ('own', 'filed', 'https://own.example.com/')",
    )
    .await
    .unwrap();
    let urls: HashMap<String, Option<String>> =
        sqlx::query_as("SELECT prompt, callback_url FROM imagegen.jobs")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(urls["plain"], None);
    assert_eq!(
        urls["lent"].as_deref(),
        Some("https://hooks.example.com/done")
    );
    assert_eq!(
        urls["one"].as_deref(),
        Some("https://hooks.example.com/done")
    );
    assert_eq!(urls["own"].as_deref(), Some("https://own.example.com/"));
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn reference_images_come_from_the_option_and_the_reference_column(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let mut o = options("refs", Format::Csv);
    o.key = Some("{slug}".into());
    o.defaults.reference_images = vec!["references/house-style.png".into()];
    let Err(SubmitError::Invalid(errors)) = submit(
        &q,
        "slug,prompt,reference\na,one,\nb,two,../etc/passwd\nc,three,a b c d e\n",
        &o,
    )
    .await
    else {
        panic!("bad references must be refused");
    };
    let lines: Vec<u64> = errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, [3, 4], "{errors:?}");
    assert!(
        errors.iter().all(|e| e.reason.contains("reference")),
        "{errors:?}"
    );

    let file = "slug,prompt,reference\na,one,\nb,two,\"https://cdn.example.com/logo.png?v=1,2 styles/x.webp\"\n";
    assert_eq!(submit(&q, file, &o).await.unwrap().inserted, 2);
    let refs: Vec<Vec<String>> = sqlx::query_scalar(
        "SELECT reference_images FROM imagegen.jobs WHERE batch = 'refs' ORDER BY batch_seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(refs[0], ["references/house-style.png"]);
    assert_eq!(
        refs[1],
        ["https://cdn.example.com/logo.png?v=1,2", "styles/x.webp"]
    );
    // Another default reference changes the row that uses it, not the one with its own.
    o.defaults.reference_images = vec!["references/new-style.png".into()];
    let r = submit(&q, file, &o).await.unwrap();
    assert_eq!((r.unchanged, r.changed.len()), (1, 1));
    assert_eq!(r.changed[0].key, "a");
    assert_eq!(r.changed[0].fields, ["reference"]);
}

/// Runs a worker on the stand-in and `storage` until nothing is left to do.
async fn run_worker(q: &Queue, storage: Storage) {
    let fake = FakeServer::start(FakeConfig {
        image_bytes: 20_000,
        api_key: Some(KEY.into()),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let client = Client::new(ClientConfig::new(fake.base_url(), KEY)).unwrap();
    let pipeline = Pipeline::new(client, storage, q.clone(), PipelineConfig::default());
    let worker = Worker::new(q.clone(), pipeline, fast_config(4));
    tokio::time::timeout(
        Duration::from_secs(180),
        worker.run(CancellationToken::new()),
    )
    .await
    .expect("the worker finishes the batch")
    .unwrap();
}

fn img_srcs(html: &str) -> Vec<(String, Option<String>)> {
    let doc = scraper::Html::parse_document(html);
    let card = scraper::Selector::parse("ol.sheet > li").unwrap();
    let key = scraper::Selector::parse(".key").unwrap();
    let img = scraper::Selector::parse("img").unwrap();
    doc.select(&card)
        .map(|li| {
            let k = li
                .select(&key)
                .next()
                .map(|e| e.text().collect::<String>())
                .unwrap_or_default();
            let src = li
                .select(&img)
                .next()
                .and_then(|i| i.value().attr("src").map(str::to_owned));
            (k, src)
        })
        .collect()
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn the_report_lists_every_row_in_file_order_with_its_urls_in_three_formats(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let location = StorageConfig::new(format!("s3://{}/t-{}", S3.bucket, uuid::Uuid::new_v4()))
        .with_path_style(S3.path_style);
    let storage = open_s3_at(&S3.endpoint, &location).await.unwrap();

    let mut o = options("report", Format::Csv);
    o.template = Some("Header for {title}".into());
    o.key = Some("{slug}".into());
    o.defaults.renditions = vec!["og".into()];
    // `state` and `key` are columns of the file too: the report prefixes them.
    let first = "slug,title,state,key\n\
                 b,Beta,draft,k1\n\
                 c,<script>alert(1)</script> & co,live,k2\n\
                 d,Delta [fault:400],live,k3\n";
    submit(&q, first, &o).await.unwrap();
    // An edited file puts a new row first: it is inserted last but reported first.
    let rest = first.split_once('\n').unwrap().1;
    let edited = format!("slug,title,state,key\na,\"Alpha, 🎉\",live,k0\n{rest}");
    let r = submit(&q, &edited, &o).await.unwrap();
    assert_eq!((r.inserted, r.unchanged), (1, 3));
    run_worker(&q, storage.clone()).await;

    let keys = ["a", "b", "c", "d"];
    let jobs = q.batch_jobs("report").await.unwrap();
    let by_key: HashMap<String, _> = jobs
        .iter()
        .map(|j| {
            (
                j.idempotency_key
                    .clone()
                    .unwrap()
                    .trim_start_matches("report:")
                    .to_owned(),
                j,
            )
        })
        .collect();
    assert_eq!(by_key["d"].state, "failed");
    for k in ["a", "b", "c"] {
        assert_eq!(by_key[k].state, "succeeded", "{k}");
    }
    let rendition_urls: HashMap<String, Value> = sqlx::query_as::<_, (String, Value)>(
        "SELECT idempotency_key, rendition_urls FROM imagegen.jobs WHERE batch = 'report'",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(k, v)| (k.trim_start_matches("report:").to_owned(), v))
    .collect();

    // CSV.
    let bytes = report::render(
        &q,
        None,
        "report",
        ReportFormat::Csv,
        &ReportOptions::default(),
    )
    .await
    .unwrap();
    let mut reader = csv::Reader::from_reader(bytes.as_slice());
    let header: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_owned)
        .collect();
    for col in [
        "key",
        "row.slug",
        "row.title",
        "row.state",
        "row.key",
        "state",
        "attempts",
        "image_url",
        "image_urls",
        "rendition.og",
        "rendition.thumb",
        "width",
        "height",
        "cost_usd",
        "error",
    ] {
        assert!(
            header.iter().any(|h| h == col),
            "{col} missing in {header:?}"
        );
    }
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    let got: Vec<&str> = records.iter().map(|r| &r[col("key")]).collect();
    assert_eq!(got, keys);
    for r in &records {
        let job = by_key[&r[col("key")]];
        assert_eq!(r[col("state")], job.state);
        assert_eq!(r[col("row.slug")], r[col("key")]);
        if job.state == "succeeded" {
            assert_eq!(r[col("image_url")], job.image_urls[0]);
            assert_eq!(r[col("image_urls")], job.image_urls.join(" "));
            let renditions = &rendition_urls[&r[col("key")]];
            assert_eq!(r[col("rendition.og")], renditions["og"][0]);
            assert_eq!(r[col("rendition.thumb")], renditions["thumb"][0]);
            assert_eq!((&r[col("width")], &r[col("height")]), ("1344", "768"));
            assert!(r[col("cost_usd")].parse::<Decimal>().unwrap() > Decimal::ZERO);
        } else {
            assert_eq!(&r[col("image_url")], "");
            assert!(!r[col("error")].is_empty());
        }
    }
    assert_eq!(&records[0][col("row.title")], "Alpha, 🎉");
    assert_eq!(&records[1][col("row.state")], "draft");

    // JSON.
    let bytes = report::render(
        &q,
        None,
        "report",
        ReportFormat::Json,
        &ReportOptions::default(),
    )
    .await
    .unwrap();
    let doc: Value = serde_json::from_slice(&bytes).unwrap();
    let jobs_json = doc["jobs"].as_array().unwrap();
    let got: Vec<&str> = jobs_json
        .iter()
        .map(|j| j["key"].as_str().unwrap())
        .collect();
    assert_eq!(got, keys);
    for j in jobs_json {
        let job = by_key[j["key"].as_str().unwrap()];
        assert_eq!(j["image_urls"], json!(job.image_urls));
        assert_eq!(j["state"], job.state.as_str());
    }
    assert_eq!(jobs_json[0]["row.title"], "Alpha, 🎉");

    // HTML: every thumbnail embedded, and it is the stored thumbnail.
    let bytes = report::render(
        &q,
        Some(&storage),
        "report",
        ReportFormat::Html,
        &ReportOptions::default(),
    )
    .await
    .unwrap();
    let html = String::from_utf8(bytes).unwrap();
    let cards = img_srcs(&html);
    let got: Vec<&str> = cards.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(got, keys);
    let thumb_keys: HashMap<i64, String> = sqlx::query_as::<_, (i64, String)>(
        "SELECT job_id, key FROM imagegen.renditions WHERE spec = 'thumb' AND idx = 0",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    for (k, src) in &cards {
        let job = by_key[k.as_str()];
        if job.state != "succeeded" {
            assert_eq!(src, &None, "{k} has no thumbnail");
            continue;
        }
        let src = src.as_deref().unwrap_or_else(|| panic!("{k} has no img"));
        let b64 = src
            .strip_prefix("data:image/webp;base64,")
            .unwrap_or_else(|| panic!("{k}: not an embedded WebP: {}", &src[..40.min(src.len())]));
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let size = imagesize::blob_size(&decoded).unwrap();
        assert_eq!(size.width, 480, "{k}");
        let stored = storage.get(&thumb_keys[&job.id]).await.unwrap();
        assert_eq!(decoded, stored.to_vec(), "{k}");
    }
    // What came from the rows is text, never markup.
    let doc = scraper::Html::parse_document(&html);
    let scripts = scraper::Selector::parse("script").unwrap();
    assert_eq!(doc.select(&scripts).count(), 0);
    let dd = scraper::Selector::parse("dd").unwrap();
    assert!(
        doc.select(&dd)
            .any(|d| d.text().collect::<String>() == "<script>alert(1)</script> & co"),
        "the row's title reads back as text"
    );
    let failed = scraper::Selector::parse("li.failed").unwrap();
    assert_eq!(doc.select(&failed).count(), 1);

    // Past the cap, thumbnails are linked and the page says so.
    let bytes = report::render(
        &q,
        Some(&storage),
        "report",
        ReportFormat::Html,
        &ReportOptions {
            embed_limit: 2,
            ..ReportOptions::default()
        },
    )
    .await
    .unwrap();
    let html = String::from_utf8(bytes).unwrap();
    assert!(html.contains("thumbnails are linked, not embedded"));
    for (k, src) in img_srcs(&html) {
        if let Some(src) = src {
            assert_eq!(
                Value::from(src),
                rendition_urls[&k]["thumb"][0],
                "{k} links its thumbnail"
            );
        }
    }

    // Presigned URLs for a private bucket.
    let bytes = report::render(
        &q,
        Some(&storage),
        "report",
        ReportFormat::Csv,
        &ReportOptions {
            presign: Some(Duration::from_secs(3600)),
            ..ReportOptions::default()
        },
    )
    .await
    .unwrap();
    let text = String::from_utf8(bytes).unwrap();
    assert!(text.contains("X-Amz-Signature="), "{text}");
}

fn database_url(opts: &PgConnectOptions) -> String {
    format!(
        "postgres://postgres@{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().expect("test database name")
    )
}

fn cli(opts: &PgConnectOptions, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .args(args)
        .env("DATABASE_URL", database_url(opts))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run imagegen");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn the_cli_submits_from_standard_input_and_names_bad_lines(pool: PgPool) {
    let opts = pool.connect_options();
    let base = [
        "batch", "submit", "-", "--format", "csv", "--batch", "cli", "--key", "{slug}",
    ];
    let (ok, _, err) = cli(&opts, &base, "slug,prompt\na,fine\nb,\"  \"\n");
    assert!(!ok);
    assert!(err.contains("line 3"), "{err}");
    assert_eq!(count(&pool, "SELECT count(*) FROM imagegen.jobs").await, 0);

    let mut dry = base.to_vec();
    dry.push("--dry-run");
    let (ok, out, err) = cli(&opts, &dry, "slug,prompt\na,one\nb,two\n");
    assert!(ok, "{err}");
    assert!(out.contains("estimate: $0.08 for 2 job(s)"), "{out}");
    assert!(out.contains("dry run: nothing was written"), "{out}");
    assert_eq!(count(&pool, "SELECT count(*) FROM imagegen.jobs").await, 0);

    let (ok, out, err) = cli(&opts, &base, "slug,prompt\na,one\nb,two\n");
    assert!(ok, "{err}");
    assert!(out.contains("submitted 2 job(s)"), "{out}");
    let (ok, out, _) = cli(&opts, &["batch", "show", "cli"], "");
    assert!(ok);
    assert!(out.contains("pending    2"), "{out}");
}
