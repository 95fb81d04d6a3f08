//! A local Solana JSON-RPC endpoint for tests, backed by LiteSVM: the real SPL Token
//! and Memo programs execute every transaction, so a delegate's allowance, a balance,
//! a wrong signer or a bad account behave as on a cluster. It speaks the JSON-RPC
//! methods the production client uses, over HTTP, and can be scripted to misbehave:
//! drop a transaction, accept one and never answer, hang before processing, lag its
//! block height or its view of recent transactions, answer 503.
//!
//! Blocks advance only when the test says so ([`FakeSolana::advance`]); a blockhash is
//! valid for 150 blocks after the block it was issued in, as on a cluster. Everything
//! that lands is immediately `finalized`.
//!
//! Include with `#[path = "common/solana.rs"] mod solana;` (it links LiteSVM, so only
//! the test binaries that need it pay for it).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use litesvm::LiteSVM;
use serde_json::{Value, json};
use solana_account::Account;
use solana_address::Address;
use solana_hash::Hash;
use solana_keypair::Keypair;
use solana_message::Message;
use solana_program_pack::Pack;
use solana_signature::Signature;
use solana_signer::Signer;
use solana_transaction::Transaction;
use solana_transaction_error::TransactionError;
use solana_transaction_status_client_types::UiTransactionError;
use spl_token_interface::state::{Account as TokenAccount, AccountState, Mint};

pub const VALID_BLOCKS: u64 = 150;
const USDC_DECIMALS: u8 = 6;

/// What the endpoint does wrong next. Counters are spent one request at a time.
#[derive(Debug, Default, Clone)]
pub struct Script {
    /// `sendTransaction` answers with the signature but the transaction never lands.
    pub drop_sends: usize,
    /// `sendTransaction` never answers and the transaction does not land.
    pub hang_sends_before: usize,
    /// `sendTransaction` lands the transaction, then never answers (a timeout after
    /// the cluster accepted it).
    pub hang_sends_after: usize,
    /// `getSignatureStatuses` never answers.
    pub hang_statuses: usize,
    /// `getLatestBlockhash` never answers.
    pub hang_blockhash: usize,
    /// `getBlockHeight` answers this many blocks behind (a lagging node).
    pub height_lag: u64,
    /// Statuses and address histories do not show transactions from the last
    /// `view_lag` blocks (a node that has not caught up with them).
    pub view_lag: u64,
    /// The next requests, of any method, answer HTTP 503.
    pub unavailable: usize,
}

struct Landed {
    signature: Signature,
    height: u64,
    err: Option<TransactionError>,
    memo: Option<String>,
    accounts: Vec<Address>,
    bytes: Vec<u8>,
}

struct State {
    svm: LiteSVM,
    height: u64,
    /// Blockhash → last block height at which it is valid.
    hashes: HashMap<Hash, u64>,
    latest: Hash,
    landed: Vec<Landed>,
    script: Script,
    sends: usize,
    hung: usize,
}

pub struct FakeSolana {
    pub url: String,
    pub mint: Address,
    pub treasury: Address,
    /// The delegate's keypair in `solana-keygen` JSON form (what the worker loads).
    pub delegate_json: String,
    pub delegate: Address,
    mint_authority: Keypair,
    st: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeSolana {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeSolana {
    pub async fn start() -> FakeSolana {
        let mut svm = LiteSVM::new()
            .with_blockhash_check(false)
            .with_transaction_history(100_000);
        let mint_authority = Keypair::new();
        let mint = Address::new_unique();
        let mut data = vec![0u8; Mint::LEN];
        Mint {
            mint_authority: Some(mint_authority.pubkey()).into(),
            supply: 0,
            decimals: USDC_DECIMALS,
            is_initialized: true,
            freeze_authority: None.into(),
        }
        .pack_into_slice(&mut data);
        svm.set_account(mint, token_program_account(&svm, data))
            .unwrap();
        let delegate = Keypair::new();
        svm.airdrop(&delegate.pubkey(), 10_000_000_000).unwrap();
        let latest = svm.latest_blockhash();
        let mut hashes = HashMap::new();
        hashes.insert(latest, VALID_BLOCKS);
        let st = Arc::new(Mutex::new(State {
            svm,
            height: 0,
            hashes,
            latest,
            landed: Vec::new(),
            script: Script::default(),
            sends: 0,
            hung: 0,
        }));
        let app = axum::Router::new()
            .route("/", axum::routing::post(rpc))
            .with_state(st.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let mut fake = FakeSolana {
            url: format!("http://{addr}"),
            mint,
            treasury: Address::default(),
            delegate_json: format!("{:?}", delegate.to_bytes().to_vec()),
            delegate: delegate.pubkey(),
            mint_authority,
            st,
            server,
        };
        fake.treasury = fake.token_account(&Keypair::new().pubkey(), 0, None);
        fake
    }

    /// A token account of `owner` holding `amount` of the mint, optionally with an
    /// allowance for a delegate (written directly, as if approved earlier).
    fn token_account(
        &self,
        owner: &Address,
        amount: u64,
        delegate: Option<(Address, u64)>,
    ) -> Address {
        self.token_account_of(self.mint, owner, amount, delegate)
    }

    /// An escrow written directly: of any mint, approved for any delegate (for the
    /// cases a customer gets wrong).
    pub fn raw_escrow(
        &self,
        mint: Option<Address>,
        amount: u64,
        delegate: Option<(Address, u64)>,
    ) -> String {
        let mint = mint.unwrap_or(self.mint);
        self.token_account_of(mint, &Address::new_unique(), amount, delegate)
            .to_string()
    }

    /// A second mint (same decimals), for wrong-mint cases.
    pub fn other_mint(&self) -> Address {
        let mut st = self.st.lock().unwrap();
        let mint = Address::new_unique();
        let mut data = vec![0u8; Mint::LEN];
        Mint {
            mint_authority: Some(self.mint_authority.pubkey()).into(),
            supply: 0,
            decimals: USDC_DECIMALS,
            is_initialized: true,
            freeze_authority: None.into(),
        }
        .pack_into_slice(&mut data);
        let acc = token_program_account(&st.svm, data);
        st.svm.set_account(mint, acc).unwrap();
        mint
    }

    fn token_account_of(
        &self,
        mint: Address,
        owner: &Address,
        amount: u64,
        delegate: Option<(Address, u64)>,
    ) -> Address {
        let mut st = self.st.lock().unwrap();
        let address = Address::new_unique();
        let mut data = vec![0u8; TokenAccount::LEN];
        TokenAccount {
            mint,
            owner: *owner,
            amount,
            delegate: delegate.map(|d| d.0).into(),
            state: AccountState::Initialized,
            is_native: None.into(),
            delegated_amount: delegate.map_or(0, |d| d.1),
            close_authority: None.into(),
        }
        .pack_into_slice(&mut data);
        let acc = token_program_account(&st.svm, data);
        st.svm.set_account(address, acc).unwrap();
        address
    }

    /// A customer's escrow: a USDC token account holding `balance` units, whose owner
    /// then approves the delegate for `allowance` units with a real `approve_checked`
    /// transaction, the way a customer sets it up.
    pub fn open_escrow(&self, balance: u64, allowance: u64) -> String {
        let owner = Keypair::new();
        let account = self.token_account(&owner.pubkey(), balance, None);
        let mut st = self.st.lock().unwrap();
        st.svm.airdrop(&owner.pubkey(), 1_000_000_000).unwrap();
        let ix = spl_token_interface::instruction::approve_checked(
            &spl_token_interface::id(),
            &account,
            &self.mint,
            &self.delegate,
            &owner.pubkey(),
            &[],
            allowance,
            USDC_DECIMALS,
        )
        .unwrap();
        let hash = st.svm.latest_blockhash();
        let tx = Transaction::new(&[&owner], Message::new(&[ix], Some(&owner.pubkey())), hash);
        st.svm.send_transaction(tx).expect("approve_checked");
        account.to_string()
    }

    pub fn script(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.st.lock().unwrap().script);
    }

    /// Produces `n` blocks, each with a new blockhash valid for 150 blocks.
    pub fn advance(&self, n: u64) {
        let mut st = self.st.lock().unwrap();
        for _ in 0..n {
            st.height += 1;
            st.svm.expire_blockhash();
            let h = st.svm.latest_blockhash();
            let valid = st.height + VALID_BLOCKS;
            st.hashes.insert(h, valid);
            st.latest = h;
        }
    }

    pub fn height(&self) -> u64 {
        self.st.lock().unwrap().height
    }

    /// How many `sendTransaction` requests arrived.
    pub fn sends(&self) -> usize {
        self.st.lock().unwrap().sends
    }

    /// How many requests are hanging (or hung before their client went away).
    pub fn hung(&self) -> usize {
        self.st.lock().unwrap().hung
    }

    /// The token amount in an account (0 if it does not exist).
    pub fn balance(&self, address: &str) -> u64 {
        self.token(address).map_or(0, |t| t.amount)
    }

    pub fn token(&self, address: &str) -> Option<TokenAccount> {
        let st = self.st.lock().unwrap();
        let acc = st.svm.get_account(&address.parse().unwrap())?;
        TokenAccount::unpack(&acc.data).ok()
    }

    /// Successful transactions carrying a charge memo, with their memos.
    pub fn charges_landed(&self) -> Vec<String> {
        let st = self.st.lock().unwrap();
        st.landed
            .iter()
            .filter(|l| l.err.is_none())
            .filter_map(|l| l.memo.clone())
            .filter(|m| m.contains("longshore:charge:"))
            .collect()
    }
}

fn token_program_account(svm: &LiteSVM, data: Vec<u8>) -> Account {
    Account {
        lamports: svm.minimum_balance_for_rent_exemption(data.len()),
        data,
        owner: spl_token_interface::id(),
        executable: false,
        rent_epoch: 0,
    }
}

fn memo_of(tx: &Transaction) -> Option<String> {
    let keys = &tx.message.account_keys;
    tx.message.instructions.iter().find_map(|ix| {
        let program = keys.get(ix.program_id_index as usize)?;
        (*program == spl_memo_interface::v3::id() || *program == spl_memo_interface::v1::id())
            .then(|| String::from_utf8_lossy(&ix.data).into_owned())
    })
}

fn ok(id: &Value, result: Value) -> Response {
    Json(json!({"jsonrpc": "2.0", "result": result, "id": id})).into_response()
}

fn rpc_error(id: &Value, code: i64, message: &str, data: Value) -> Response {
    Json(json!({"jsonrpc": "2.0", "error": {"code": code, "message": message, "data": data}, "id": id}))
        .into_response()
}

/// A `sendTransaction` refused in preflight, the way a node reports it.
fn preflight(id: &Value, err: TransactionError, logs: Vec<String>) -> Response {
    let message = format!("Transaction simulation failed: {err}");
    let data = json!({
        "err": serde_json::to_value(UiTransactionError::from(err)).unwrap(),
        "logs": logs,
        "accounts": null,
        "unitsConsumed": 0,
        "returnData": null,
        "innerInstructions": null,
    });
    rpc_error(id, -32002, &message, data)
}

fn address_param(v: &Value) -> Option<Address> {
    v.as_str()?.parse().ok()
}

fn bad_address(id: &Value) -> Response {
    rpc_error(
        id,
        -32602,
        "Invalid param: not a valid address",
        Value::Null,
    )
}

fn context(slot: u64) -> Value {
    json!({"slot": slot, "apiVersion": "4.2.2"})
}

fn take_unavailable(st: &Arc<Mutex<State>>) -> bool {
    let mut s = st.lock().unwrap();
    let u = s.script.unavailable > 0;
    if u {
        s.script.unavailable -= 1;
    }
    u
}

fn take_hang(st: &Arc<Mutex<State>>) -> bool {
    let mut s = st.lock().unwrap();
    let h = s.script.hang_statuses > 0;
    if h {
        s.script.hang_statuses -= 1;
    }
    h
}

async fn hang(st: &Arc<Mutex<State>>) -> Response {
    st.lock().unwrap().hung += 1;
    std::future::pending::<()>().await;
    unreachable!()
}

async fn rpc(AxState(st): AxState<Arc<Mutex<State>>>, Json(req): Json<Value>) -> Response {
    let id = req["id"].clone();
    let params = req["params"].clone();
    let method = req["method"].as_str().unwrap_or_default().to_string();
    if take_unavailable(&st) {
        return (StatusCode::SERVICE_UNAVAILABLE, "node unavailable").into_response();
    }
    match method.as_str() {
        "getVersion" => ok(&id, json!({"solana-core": "4.2.2", "feature-set": 0})),
        "getLatestBlockhash" => {
            let answer = {
                let mut s = st.lock().unwrap();
                if s.script.hang_blockhash > 0 {
                    s.script.hang_blockhash -= 1;
                    None
                } else {
                    let lvbh = s.hashes[&s.latest];
                    Some(
                        json!({"context": context(s.height), "value": {"blockhash": s.latest.to_string(), "lastValidBlockHeight": lvbh}}),
                    )
                }
            };
            match answer {
                Some(a) => ok(&id, a),
                None => hang(&st).await,
            }
        }
        "getBlockHeight" => {
            let s = st.lock().unwrap();
            ok(&id, json!(s.height.saturating_sub(s.script.height_lag)))
        }
        "sendTransaction" => send(&st, &id, &params).await,
        "getSignatureStatuses" => {
            if take_hang(&st) {
                return hang(&st).await;
            }
            let s = st.lock().unwrap();
            let visible = s.height.saturating_sub(s.script.view_lag);
            let value: Vec<Value> = params[0]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|sig| {
                    let sig = sig.as_str().unwrap_or_default();
                    s.landed
                        .iter()
                        .find(|l| l.signature.to_string() == sig && l.height <= visible)
                        .map_or(Value::Null, |l| {
                            let err = l
                                .err
                                .clone()
                                .map(|e| serde_json::to_value(UiTransactionError::from(e)).unwrap());
                            let status = match &err {
                                None => json!({"Ok": null}),
                                Some(e) => json!({"Err": e}),
                            };
                            json!({"slot": l.height, "confirmations": null, "status": status, "err": err, "confirmationStatus": "finalized"})
                        })
                })
                .collect();
            ok(&id, json!({"context": context(s.height), "value": value}))
        }
        "getSignaturesForAddress" => {
            let s = st.lock().unwrap();
            let Some(address) = address_param(&params[0]) else {
                return bad_address(&id);
            };
            let limit = params[1]["limit"].as_u64().unwrap_or(1000) as usize;
            let before = params[1]["before"].as_str();
            let visible = s.height.saturating_sub(s.script.view_lag);
            let list: Vec<Value> = s
                .landed
                .iter()
                .rev()
                // Newest first; `before`: only what is older than that signature.
                .skip_while(|l| before.is_some_and(|b| l.signature.to_string() != b))
                .skip(usize::from(before.is_some()))
                .filter(|l| l.height <= visible && l.accounts.contains(&address))
                .take(limit)
                .map(|l| {
                    json!({
                        "signature": l.signature.to_string(),
                        "slot": l.height,
                        "err": l.err.clone().map(|e| serde_json::to_value(UiTransactionError::from(e)).unwrap()),
                        // A node reports memos as "[length] text".
                        "memo": l.memo.as_ref().map(|m| format!("[{}] {m}", m.len())),
                        "blockTime": null,
                        "confirmationStatus": "finalized",
                    })
                })
                .collect();
            ok(&id, json!(list))
        }
        "getAccountInfo" => {
            let s = st.lock().unwrap();
            let Some(address) = address_param(&params[0]) else {
                return bad_address(&id);
            };
            let value = s.svm.get_account(&address).map_or(Value::Null, |a| {
                json!({
                    "data": [base64::engine::general_purpose::STANDARD.encode(&a.data), "base64"],
                    "executable": a.executable,
                    "lamports": a.lamports,
                    "owner": a.owner.to_string(),
                    "rentEpoch": a.rent_epoch,
                    "space": a.data.len(),
                })
            });
            ok(&id, json!({"context": context(s.height), "value": value}))
        }
        "getTransaction" => {
            let s = st.lock().unwrap();
            let sig = params[0].as_str().unwrap_or_default();
            match s.landed.iter().find(|l| l.signature.to_string() == sig) {
                None => ok(&id, Value::Null),
                Some(l) => ok(
                    &id,
                    json!({
                        "slot": l.height,
                        "transaction": [base64::engine::general_purpose::STANDARD.encode(&l.bytes), "base64"],
                        "meta": null,
                        "blockTime": null,
                    }),
                ),
            }
        }
        other => rpc_error(
            &id,
            -32601,
            &format!("Method not found: {other}"),
            Value::Null,
        ),
    }
}

async fn send(st: &Arc<Mutex<State>>, id: &Value, params: &Value) -> Response {
    let Some(bytes) = params[0]
        .as_str()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
    else {
        return rpc_error(id, -32602, "invalid transaction: not base64", Value::Null);
    };
    let Ok(tx) = wincode::deserialize::<Transaction>(&bytes) else {
        return rpc_error(
            id,
            -32602,
            "invalid transaction: failed to deserialize",
            Value::Null,
        );
    };
    let processed = process(&mut st.lock().unwrap(), id, tx, bytes);
    match processed {
        Ok(r) => r,
        Err(Hang) => hang(st).await,
    }
}

struct Hang;

/// `sendTransaction` as a node does it (blockhash, duplicate and preflight checks),
/// with the script's faults. `Err(Hang)`: the answer never comes.
fn process(s: &mut State, id: &Value, tx: Transaction, bytes: Vec<u8>) -> Result<Response, Hang> {
    let signature = tx.signatures[0];
    s.sends += 1;
    if s.script.hang_sends_before > 0 {
        s.script.hang_sends_before -= 1;
        return Err(Hang);
    }
    if s.landed.iter().any(|l| l.signature == signature) {
        return Ok(preflight(id, TransactionError::AlreadyProcessed, vec![]));
    }
    let height = s.height;
    match s.hashes.get(&tx.message.recent_blockhash) {
        Some(valid) if height <= *valid => {}
        _ => return Ok(preflight(id, TransactionError::BlockhashNotFound, vec![])),
    }
    if let Err(f) = s.svm.simulate_transaction(tx.clone()) {
        return Ok(preflight(id, f.err, f.meta.logs));
    }
    if s.script.drop_sends > 0 {
        s.script.drop_sends -= 1;
        return Ok(ok(id, json!(signature.to_string())));
    }
    let err = s.svm.send_transaction(tx.clone()).err().map(|f| f.err);
    s.landed.push(Landed {
        signature,
        height,
        err,
        memo: memo_of(&tx),
        accounts: tx.message.account_keys.clone(),
        bytes,
    });
    if s.script.hang_sends_after > 0 {
        s.script.hang_sends_after -= 1;
        return Err(Hang);
    }
    Ok(ok(id, json!(signature.to_string())))
}

/// Waits until `f` holds, polling (the fake's state changes from other tasks).
pub async fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
