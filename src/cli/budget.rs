//! `imagegen budget daily ...`: the installation's daily budget, kept in the database so every
//! worker obeys the same one.

use clap::Subcommand;
use imagegen::queue::Queue;
use rust_decimal::Decimal;

use super::explain_constraint;

#[derive(Subcommand)]
pub enum DailyCommand {
    /// Set the daily budget in USD: no call starts that could take today's (UTC) spend past it.
    Set { usd: Decimal },
    /// Remove the daily budget.
    Clear,
    /// Show the daily budget and today's spend.
    Show,
}

pub async fn daily(q: Queue, cmd: DailyCommand) -> anyhow::Result<()> {
    match cmd {
        DailyCommand::Set { usd } => {
            q.set_daily_budget(Some(usd))
                .await
                .map_err(explain_constraint)?;
            println!("daily budget: ${usd} (every worker, from its next call)");
        }
        DailyCommand::Clear => {
            q.set_daily_budget(None).await?;
            println!("no daily budget");
        }
        DailyCommand::Show => {
            let stats = q.stats().await?;
            match stats.daily_budget_usd {
                Some(b) => println!(
                    "daily budget: ${b}; spent today (UTC): ${}; left: ${}",
                    stats.spend_today_usd.round_dp(4),
                    stats
                        .daily_budget_remaining_usd
                        .unwrap_or_default()
                        .round_dp(4)
                ),
                None => println!(
                    "no daily budget; spent today (UTC): ${}",
                    stats.spend_today_usd.round_dp(4)
                ),
            }
        }
    }
    Ok(())
}
