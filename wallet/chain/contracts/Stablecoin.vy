# pragma version 0.4.3
# pragma evm-version shanghai
"""
@title Inferswarm test stablecoin (ISC)
@notice An ERC-20 with 6 decimals, as USDC: one token unit is one micro-credit. EIP-3009
        `transferWithAuthorization` lets a holder pay with a signed authorization that anyone
        may submit (what x402's "exact" scheme settles). The deployer may mint: it is a test
        coin for devnets, not money.
"""

from ethereum.ercs import IERC20

implements: IERC20

event Transfer:
    sender: indexed(address)
    receiver: indexed(address)
    value: uint256

event Approval:
    owner: indexed(address)
    spender: indexed(address)
    value: uint256

event AuthorizationUsed:
    authorizer: indexed(address)
    nonce: indexed(bytes32)

name: public(String[32])
symbol: public(String[8])
version: public(String[8])
decimals: public(constant(uint8)) = 6
totalSupply: public(uint256)
balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
minter: public(address)
authorizationState: public(HashMap[address, HashMap[bytes32, bool]])

EIP712_DOMAIN_TYPEHASH: constant(bytes32) = keccak256(
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
TRANSFER_WITH_AUTHORIZATION_TYPEHASH: constant(bytes32) = keccak256(
    "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
)
# secp256k1's order / 2: a signature with a higher s is the malleated twin of another
HALF_ORDER: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168


@deploy
def __init__(_name: String[32], _symbol: String[8]):
    self.name = _name
    self.symbol = _symbol
    self.version = "2"
    self.minter = msg.sender


@external
def transfer(_to: address, _value: uint256) -> bool:
    self._transfer(msg.sender, _to, _value)
    return True


@external
def transferFrom(_from: address, _to: address, _value: uint256) -> bool:
    allowed: uint256 = self.allowance[_from][msg.sender]
    assert allowed >= _value, "allowance"
    if allowed != max_value(uint256):
        self.allowance[_from][msg.sender] = allowed - _value
    self._transfer(_from, _to, _value)
    return True


@external
def approve(_spender: address, _value: uint256) -> bool:
    self.allowance[msg.sender][_spender] = _value
    log Approval(owner=msg.sender, spender=_spender, value=_value)
    return True


@external
def mint(_to: address, _value: uint256):
    assert msg.sender == self.minter, "minter only"
    assert _to != empty(address), "zero address"
    self.totalSupply += _value
    self.balanceOf[_to] += _value
    log Transfer(sender=empty(address), receiver=_to, value=_value)


@view
@external
def DOMAIN_SEPARATOR() -> bytes32:
    return self._domain_separator()


@external
def transferWithAuthorization(
    _from: address, _to: address, _value: uint256, _valid_after: uint256, _valid_before: uint256,
    _nonce: bytes32, _v: uint8, _r: bytes32, _s: bytes32
):
    assert block.timestamp > _valid_after, "authorization not yet valid"
    assert block.timestamp < _valid_before, "authorization expired"
    assert not self.authorizationState[_from][_nonce], "authorization used"
    digest: bytes32 = keccak256(concat(
        b"\x19\x01",
        self._domain_separator(),
        keccak256(abi_encode(TRANSFER_WITH_AUTHORIZATION_TYPEHASH, _from, _to, _value, _valid_after,
                             _valid_before, _nonce)),
    ))
    assert convert(_s, uint256) <= HALF_ORDER, "malleable signature"
    signer: address = ecrecover(digest, _v, _r, _s)
    assert signer != empty(address) and signer == _from, "bad signature"
    self.authorizationState[_from][_nonce] = True
    log AuthorizationUsed(authorizer=_from, nonce=_nonce)
    self._transfer(_from, _to, _value)


@view
@internal
def _domain_separator() -> bytes32:
    return keccak256(abi_encode(EIP712_DOMAIN_TYPEHASH, keccak256(self.name), keccak256(self.version), chain.id,
                                self))


@internal
def _transfer(_from: address, _to: address, _value: uint256):
    assert _to != empty(address), "zero address"
    assert self.balanceOf[_from] >= _value, "balance"
    self.balanceOf[_from] -= _value
    self.balanceOf[_to] += _value
    log Transfer(sender=_from, receiver=_to, value=_value)
