"""The Redis AccountStore's money moves and limits: one Lua script each, atomic on the server.

Key layout (P is the key prefix, `fluxserve` by default, shared with the job store's keys):

    P:accounts:account:<id>       hash    id, name, balance, reserved (integers, micro-credits),
                                          rate_per_minute, max_in_flight, created_at, webhook_secret;
                                          models (JSON list; absent = every model) and webhook_url
                                          (absent = none) when set
    P:accounts:names              hash    account name -> account id (names are unique)
    P:accounts:accounts           list    account ids, oldest first
    P:accounts:key:<id>           hash    id, account_id, digest, created_at; revoked_at once revoked
                                          (and `_revoked_by`, the token of the call that revoked it)
    P:accounts:keys               list    key ids, oldest first (keys are never deleted)
    P:accounts:reservation:<job>  hash    job_id, account_id, key_id, amount, state (open | charged |
                                          released), created_at; settled_at and `_settled_by` once settled
    P:accounts:open               zset    open reservations: score = created_at, member = job id
    P:accounts:in_flight:<key>    set     the key's open reservations (job ids)
    P:accounts:ledger:<account>   list    the account's ledger entries, oldest first: JSON objects with the
                                          LedgerEntry fields, integers as decimal strings (exact past 2^53
                                          where Lua's JSON encoder would round)
    P:accounts:ledger_seq         string  the ledger's sequence counter (one across all accounts)
    P:accounts:op:<token>         string  a top-up already applied, kept a day: the client's retry of the
                                          same call changes nothing
    P:accounts:rate:<bucket>      string  GCRA theoretical arrival time (server clock); it expires once
                                          it is in the past, when a missing bucket means the same
    P:secret:<name>               string  a deployment-wide server secret (SET NX: the first one stays)

Every script takes the prefix as ARGV[1] and reads time from the Redis server's clock (TIME), so every
host agrees on limits and timestamps. A script that fails part-way keeps what it already wrote (Redis
has no rollback), so each one makes every check before its first write; `plan_move` is that check for
a money move and `apply_move` the write. The invariants (balance >= 0, 0 <= reserved <= balance) are
checked there for every move, whatever called it.

The client retries a command whose connection broke, so every script answers a repeat of a call that
already took effect as it answered the first time: CREATE knows its own account id, RESERVE its job id,
SETTLE, REVOKE and TOP_UP a token the caller made for that one call.
"""

from __future__ import annotations

PRELUDE = """
local P = ARGV[1] .. ':accounts:'
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function num(x) return string.format('%.6f', x) end
local function int(x) return string.format('%d', x) end
local function account_key(id) return P .. 'account:' .. id end
local function reservation_key(job_id) return P .. 'reservation:' .. job_id end
local function key_key(id) return P .. 'key:' .. id end
local function fail(message) error({err = message}) end
-- The balance and reserved amount after a move, or an error (and nothing written).
local function plan_move(account_id, amount, reserved_change)
  local values = redis.call('HMGET', account_key(account_id), 'balance', 'reserved')
  if not values[1] then fail('no account ' .. account_id) end
  local balance = tonumber(values[1]) + amount
  local reserved = tonumber(values[2]) + reserved_change
  if balance < 0 then fail('a balance cannot go negative') end
  if reserved < 0 or reserved > balance then fail('the reserved amount must stay within the balance') end
  return balance, reserved
end
-- Write a planned move and its ledger entry ('' for no job id or note).
local function apply_move(account_id, kind, amount, reserved_change, balance, reserved, job_id, note, t)
  redis.call('HSET', account_key(account_id), 'balance', int(balance), 'reserved', int(reserved))
  local entry = {
    seq = int(redis.call('INCR', P .. 'ledger_seq')), at = num(t), account_id = account_id, kind = kind,
    amount = int(amount), reserved_change = int(reserved_change),
    balance_after = int(balance), reserved_after = int(reserved),
    job_id = job_id ~= '' and job_id or cjson.null, note = note ~= '' and note or cjson.null,
  }
  redis.call('RPUSH', P .. 'ledger:' .. account_id, cjson.encode(entry))
end
local function move(account_id, kind, amount, reserved_change, job_id, note, t)
  local balance, reserved = plan_move(account_id, amount, reserved_change)
  apply_move(account_id, kind, amount, reserved_change, balance, reserved, job_id, note, t)
end
"""

# ARGV: P, id, name, credits, rate_per_minute, max_in_flight, models JSON ('' = all), webhook secret.
# -> 'created' | 'existing' (this call's retry) | 'taken' (the name belongs to another account)
CREATE = """
local id, name = ARGV[2], ARGV[3]
local credits, rate, in_flight = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local owner = redis.call('HGET', P .. 'names', name)
if owner then return owner == id and 'existing' or 'taken' end
if credits < 0 or rate < 0 or in_flight < 0 then fail('credits and limits must not be negative') end
if redis.call('EXISTS', account_key(id)) == 1 then fail('account id ' .. id .. ' is taken') end
local t = now()
redis.call('HSET', P .. 'names', name, id)
redis.call('RPUSH', P .. 'accounts', id)
redis.call('HSET', account_key(id), 'id', id, 'name', name, 'balance', '0', 'reserved', '0',
           'rate_per_minute', ARGV[5], 'max_in_flight', int(in_flight), 'created_at', num(t),
           'webhook_secret', ARGV[8])
if ARGV[7] ~= '' then redis.call('HSET', account_key(id), 'models', ARGV[7]) end
apply_move(id, 'credit', credits, 0, credits, 0, '', 'opening balance', t)
return 'created'
"""

# ARGV: P, account id, credits, note, token -> 'ok' | 'no_account'
TOP_UP = """
local id, credits, op = ARGV[2], tonumber(ARGV[3]), P .. 'op:' .. ARGV[5]
if not (credits > 0) then fail('a top-up adds a positive amount of credits') end
if redis.call('EXISTS', account_key(id)) == 0 then return 'no_account' end
if redis.call('EXISTS', op) == 1 then return 'ok' end
move(id, 'credit', credits, 0, '', ARGV[4], now())
redis.call('SET', op, '1', 'EX', 86400)
return 'ok'
"""

# ARGV: P, key id, account id, digest -> {'ok', record} | {'no_account'} | {'taken'}
ADD_KEY = """
local id, account_id, digest = ARGV[2], ARGV[3], ARGV[4]
local key = key_key(id)
if redis.call('EXISTS', account_key(account_id)) == 0 then return {'no_account'} end
local existing = redis.call('HMGET', key, 'account_id', 'digest')
if existing[1] then
  if existing[1] == account_id and existing[2] == digest then return {'ok', redis.call('HGETALL', key)} end
  return {'taken'}
end
redis.call('HSET', key, 'id', id, 'account_id', account_id, 'digest', digest, 'created_at', num(now()))
redis.call('RPUSH', P .. 'keys', id)
return {'ok', redis.call('HGETALL', key)}
"""

# ARGV: P, key id, token -> 1 when this call revoked the key, else 0
REVOKE_KEY = """
local key, token = key_key(ARGV[2]), ARGV[3]
local values = redis.call('HMGET', key, 'id', 'revoked_at', '_revoked_by')
if not values[1] then return 0 end
if values[2] then return values[3] == token and 1 or 0 end
redis.call('HSET', key, 'revoked_at', num(now()), '_revoked_by', token)
return 1
"""

# ARGV: P, account id, field ('webhook_url' | 'webhook_secret'), value ('' = remove) -> 1, or 0 (no account)
SET_ACCOUNT_FIELD = """
local key, field, value = account_key(ARGV[2]), ARGV[3], ARGV[4]
if field ~= 'webhook_url' and field ~= 'webhook_secret' then fail('not a settable field: ' .. field) end
if redis.call('EXISTS', key) == 0 then return 0 end
if value == '' then redis.call('HDEL', key, field) else redis.call('HSET', key, field, value) end
return 1
"""

# ARGV: P, job id, account id, key id, amount
# -> {'reserved' | 'existing', record} | {'in_flight', limit} | {'credits', available} | {'no_account'}
RESERVE = """
local job_id, account_id, key_id, amount = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local record = reservation_key(job_id)
if redis.call('EXISTS', record) == 1 then return {'existing', redis.call('HGETALL', record)} end
if not (amount >= 0) then fail('a reservation holds a non-negative amount') end
local account = redis.call('HMGET', account_key(account_id), 'balance', 'reserved', 'max_in_flight')
if not account[1] then return {'no_account'} end
local limit = tonumber(account[3])
local flying = P .. 'in_flight:' .. key_id
if limit > 0 and redis.call('SCARD', flying) >= limit then return {'in_flight', int(limit)} end
local available = tonumber(account[1]) - tonumber(account[2])
if available < amount then return {'credits', int(available)} end
local t = now()
move(account_id, 'reserve', 0, amount, job_id, '', t)
redis.call('HSET', record, 'job_id', job_id, 'account_id', account_id, 'key_id', key_id, 'amount', int(amount),
           'state', 'open', 'created_at', num(t))
redis.call('ZADD', P .. 'open', t, job_id)
redis.call('SADD', flying, job_id)
return {'reserved', redis.call('HGETALL', record)}
"""

# ARGV: P, job id, '1' charge | '0' release, token -> 1 when this call settled it, else 0
SETTLE = """
local job_id, charge, token = ARGV[2], ARGV[3] == '1', ARGV[4]
local record = reservation_key(job_id)
local r = redis.call('HMGET', record, 'state', 'account_id', 'amount', 'key_id', '_settled_by')
if not r[1] then return 0 end
if r[1] ~= 'open' then return r[5] == token and 1 or 0 end
local amount, t = tonumber(r[3]), now()
if charge then
  move(r[2], 'charge', -amount, -amount, job_id, '', t)
else
  move(r[2], 'release', 0, -amount, job_id, '', t)
end
redis.call('HSET', record, 'state', charge and 'charged' or 'released', 'settled_at', num(t), '_settled_by', token)
redis.call('ZREM', P .. 'open', job_id)
redis.call('SREM', P .. 'in_flight:' .. r[4], job_id)
return 1
"""

# GCRA (see fluxserve.accounts.ratelimit, whose arithmetic this repeats) on the server's clock.
# ARGV: P, bucket, rate per minute (> 0) -> '0' when allowed (and counted), else the seconds to wait
TAKE_TOKEN = """
local key, rate = P .. 'rate:' .. ARGV[2], tonumber(ARGV[3])
if not (rate > 0) then fail('a rate limit needs a positive rate') end
local interval = 60.0 / rate
local tolerance = interval * (math.max(1, math.ceil(rate)) - 1)
local t = now()
local tat = math.max(tonumber(redis.call('GET', key) or '0'), t)
local wait = tat - t - tolerance
if wait > 0 then return num(wait) end
tat = tat + interval
redis.call('SET', key, num(tat), 'PX', int(math.ceil((tat - t) * 1000) + 1000))
return '0'
"""
